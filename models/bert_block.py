"""A small seeded BERT/MiniLM-style encoder spelled the way the transformers ONNX
exporter spells it (Gather embeddings, LayerNormalization, MatMul+Add linears with
the bias first, Reshape/Transpose heads, Div-scaled scores, an additive mask made
with ``Where(mask, 0, finfo(float32).min)``, Softmax, Erf GELU). Built with onnx
helpers; no torch.

    python models/bert_block.py OUT_DIR   # writes bert_block.onnx, calib.npz, eval.npz

Inputs:  ``input_ids`` [batch, sequence] int64, ``attention_mask`` [batch, sequence] int64
Output:  ``last_hidden_state`` [batch, sequence, hidden] float32

Initializers carry the Hugging Face state-dict names (``encoder.layer.0.attention.self.query.weight``
...), but the linear weights are stored pre-transposed as [in, out] for MatMul, as the
exporter stores them. A few hidden channels (the same ones in every LayerNorm) get a
gamma 10-20x larger than the rest, so the residual stream carries activation outliers
(about 20-25x the median channel) as real transformers do; the weight rows that read
those channels (query/key/value/intermediate) are scaled down by the same factor so the
pre-activations stay in a trained model's range. The mask is deliberately the transformers-5 spelling: masked
scores hold about -3.4e38.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or loaded by path
from graph_builder import GraphBuilder, plant_outliers, write_with_data  # noqa: E402

OPSET = 17
PAD_ID = 0
MASK_MIN = float(np.finfo(np.float32).min)  # -3.4028234663852886e38, as transformers 5 writes it

# Weight gains (times 1/sqrt(fan_in)), chosen so the activations look like a trained
# encoder's: attention neither uniform nor one-hot (mean max-prob about 0.4-0.55), and
# the residual branches large enough that the LayerNorm outlier channels stay at about
# 20-25x the median channel instead of compounding from layer to layer (in a post-LN
# block each LayerNorm output is the next residual).
GAIN = {"qk": 1.5, "v": 4.0, "attn_out": 12.0, "ffn_in": 2.0, "ffn_out": 24.0}


_Builder = GraphBuilder


def _linear_weight(rng, d_in, d_out, gain=1.0):
    return rng.standard_normal((d_in, d_out)) * (gain / math.sqrt(d_in))


def build(seed: int = 0, *, vocab: int = 1000, hidden: int = 64, heads: int = 4, layers: int = 2,
          intermediate: int = 128, max_pos: int = 128, type_vocab: int = 2, eps: float = 1e-12,
          outlier_channels: int = 3) -> onnx.ModelProto:
    """The encoder as a ModelProto (opset 17, IR 8), weights drawn from `seed`."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    b = _Builder()
    outliers, outlier_gain = plant_outliers(rng, hidden, outlier_channels)

    def layer_norm(x, scope, prefix, output=None):
        gamma = rng.uniform(0.8, 1.2, hidden)
        gamma[outliers] *= outlier_gain
        beta = rng.normal(0.0, 0.05, hidden)
        return b.node("LayerNormalization", [x, b.init(f"{prefix}.weight", gamma), b.init(f"{prefix}.bias", beta)],
                      f"{scope}/LayerNorm", output=output, axis=-1, epsilon=eps)

    def linear(x, scope, prefix, d_in, d_out, gain=1.0, from_stream=False):
        w = _linear_weight(rng, d_in, d_out, gain)
        if from_stream:  # rows that read the outlier channels are smaller, so pre-activations stay sane
            w[outliers] /= outlier_gain[:, None]
        w = b.init(f"{prefix}.weight", w)
        bias = b.init(f"{prefix}.bias", rng.normal(0.0, 0.05, d_out))
        y = b.node("MatMul", [x, w], scope)
        return b.node("Add", [bias, y], scope)  # the exporter's aten::linear: Add(bias, MatMul)

    # -- embeddings: word + token type (buffer of zeros) + position (buffer arange), LayerNorm
    e = "/embeddings"
    word = b.node("Gather", [b.init("embeddings.word_embeddings.weight", rng.standard_normal((vocab, hidden))),
                             "input_ids"], f"{e}/word_embeddings")
    shape = b.node("Shape", ["input_ids"], e)
    seq = b.node("Gather", [shape, b.const(1, np.int64)], e, axis=0)
    seq1 = b.node("Unsqueeze", [seq, b.const([0], np.int64)], e)
    pos_buf = b.init("embeddings.position_ids", np.arange(max_pos)[None, :], np.int64)
    type_buf = b.init("embeddings.token_type_ids", np.zeros((1, max_pos)), np.int64)
    type_ids = b.node("Slice", [type_buf, b.const([0], np.int64), seq1, b.const([1], np.int64)], e)
    type_ids = b.node("Expand", [type_ids, shape], e)
    types = b.node("Gather", [b.init("embeddings.token_type_embeddings.weight",
                                     rng.standard_normal((type_vocab, hidden)) * 0.3), type_ids],
                   f"{e}/token_type_embeddings")
    h = b.node("Add", [word, types], e)
    pos_ids = b.node("Slice", [pos_buf, b.const([0], np.int64), seq1, b.const([1], np.int64)], e)
    pos = b.node("Gather", [b.init("embeddings.position_embeddings.weight",
                                   rng.standard_normal((max_pos, hidden)) * 0.5), pos_ids],
                 f"{e}/position_embeddings")
    h = b.node("Add", [h, pos], e)
    h = layer_norm(h, e, "embeddings.LayerNorm")

    # -- extended attention mask [B, 1, 1, S]: 0 where attended, finfo.min where masked
    m = b.node("Unsqueeze", ["attention_mask", b.const([1, 2], np.int64)], "")
    m = b.node("Cast", [m], "", to=TensorProto.BOOL)
    mask = b.node("Where", [m, b.const(0.0), b.const(MASK_MIN)], "")

    for i in range(layers):
        p, sd = f"/encoder/layer.{i}", f"encoder.layer.{i}"
        s = f"{p}/attention/self"
        heads_shape = b.const([0, 0, heads, head_dim], np.int64)
        q, k, v = (linear(h, f"{s}/{n}", f"{sd}.attention.self.{n}", hidden, hidden, gain=GAIN[g], from_stream=True)
                   for n, g in (("query", "qk"), ("key", "qk"), ("value", "v")))
        q = b.node("Transpose", [b.node("Reshape", [q, heads_shape], s)], s, perm=[0, 2, 1, 3])  # [B,H,S,D]
        k = b.node("Transpose", [b.node("Reshape", [k, heads_shape], s)], s, perm=[0, 2, 3, 1])  # [B,H,D,S]
        v = b.node("Transpose", [b.node("Reshape", [v, heads_shape], s)], s, perm=[0, 2, 1, 3])  # [B,H,S,D]
        scores = b.node("MatMul", [q, k], s)
        scores = b.node("Div", [scores, b.const(math.sqrt(head_dim))], s)
        scores = b.node("Add", [scores, mask], s)
        probs = b.node("Softmax", [scores], s, axis=-1)
        ctx = b.node("MatMul", [probs, v], s)
        ctx = b.node("Transpose", [ctx], s, perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, b.const([0, 0, hidden], np.int64)], s)
        o = f"{p}/attention/output"
        a = linear(ctx, f"{o}/dense", f"{sd}.attention.output.dense", hidden, hidden, gain=GAIN["attn_out"])
        a = b.node("Add", [a, h], o)
        h = layer_norm(a, o, f"{sd}.attention.output.LayerNorm")
        # FFN with the exact (Erf) GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
        f = linear(h, f"{p}/intermediate/dense", f"{sd}.intermediate.dense", hidden, intermediate,
                   gain=GAIN["ffn_in"], from_stream=True)
        g = f"{p}/intermediate/intermediate_act_fn"
        t = b.node("Div", [f, b.const(math.sqrt(2.0))], g)
        t = b.node("Erf", [t], g)
        t = b.node("Add", [t, b.const(1.0)], g)
        t = b.node("Mul", [f, t], g)
        t = b.node("Mul", [t, b.const(0.5)], g)
        o = f"{p}/output"
        f = linear(t, f"{o}/dense", f"{sd}.output.dense", intermediate, hidden, gain=GAIN["ffn_out"])
        f = b.node("Add", [f, h], o)
        h = layer_norm(f, o, f"{sd}.output.LayerNorm", output="last_hidden_state" if i == layers - 1 else None)
    if layers == 0:
        h = b.node("Identity", [h], "", output="last_hidden_state")

    graph = helper.make_graph(
        b.nodes, "bert_block",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcompile-models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sample_inputs(n: int, seed: int, seq: int = 16, vocab: int = 1000, pad_fraction: float = 0.5,
                  min_len: int = 4) -> dict[str, np.ndarray]:
    """`n` rows of token ids in [1, vocab) with an attention mask; about `pad_fraction`
    of the rows have a padded tail (mask 0, id PAD_ID=0) of random length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, seq)).astype(np.int64)
    lengths = np.where(rng.random(n) < pad_fraction, rng.integers(min(min_len, seq), seq, size=n), seq)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = PAD_ID
    return {"input_ids": ids, "attention_mask": mask}


def write(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    return write_with_data(out_dir, "bert_block.onnx", build(seed), sample_inputs, seed)


if __name__ == "__main__":
    for kind, path in write(sys.argv[1] if len(sys.argv) > 1 else "build/bert_block").items():
        print(f"{kind}: {path}")
