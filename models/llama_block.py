"""A small seeded Llama-style decoder with a KV cache, spelled the way the Hugging Face
ONNX exports spell it: RMSNorm written out (Pow, ReduceMean, Add eps, Sqrt, Reciprocal,
Mul, Mul weight), rotary embeddings from cos/sin caches Gathered by `position_ids` with
rotate_half as Slice/Neg/Concat, past K/V Concat-ed on the sequence axis into `present`,
grouped-query attention by Unsqueeze/Expand/Reshape of the K/V heads, an additive causal
+ padding mask (``Where(allowed, 0, finfo(float32).min)``), a SiLU-gated MLP (x*Sigmoid(x))
and an lm_head MatMul. Built with onnx helpers; no torch.

    python models/llama_block.py OUT_DIR   # writes llama_block.onnx, calib.npz, eval.npz

Inputs:
    input_ids                      [batch, sequence] int64
    attention_mask                 [batch, total_sequence] int64 (total = past + sequence)
    position_ids                   [batch, sequence] int64
    past_key_values.{i}.key/.value [batch, kv_heads, past_sequence, head_dim] float32
Outputs:
    logits                         [batch, sequence, vocab] float32
    present.{i}.key/.value         [batch, kv_heads, total_sequence, head_dim] float32

The mask is built from the shapes: the queries sit at absolute positions past..total-1
(past = total - sequence), a query may see key j when j <= its position and
attention_mask[b, j] == 1. The same graph is therefore right for a prefill (past length
0) and for one-token decode steps; `decode()` runs such a greedy loop.

calib.npz / eval.npz hold prefills with past length 0: the past arrays have shape
[N, kv_heads, 0, head_dim] (numpy saves them and onnxruntime accepts the empty axis).

Initializers carry the Hugging Face state-dict names (``model.layers.0.self_attn.q_proj.weight``
...) with the linear weights stored pre-transposed as [in, out] for MatMul, plus
``model.rotary_emb.cos_cached`` / ``sin_cached`` [max_pos, head_dim].
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
MASK_MIN = float(np.finfo(np.float32).min)  # -3.4028234663852886e38, as transformers writes it
INT64_MAX = np.iinfo(np.int64).max


_Builder = GraphBuilder


def rope_cache(max_pos: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_pos, head_dim] as transformers' LlamaRotaryEmbedding computes them."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def build(seed: int = 0, *, vocab: int = 512, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
          head_dim: int = 16, layers: int = 2, intermediate: int = 128, rope_theta: float = 10000.0,
          max_pos: int = 256, eps: float = 1e-6, outlier_channels: int = 2, outlier_gain: tuple = (10.0, 20.0),
          dtype=np.float32, builder: GraphBuilder | None = None, check: bool = True) -> onnx.ModelProto:
    """The decoder as a ModelProto (opset 17, IR 8), weights drawn from `seed`.

    `max_pos` bounds position_ids (the size of the rotary caches). A few hidden channels
    (`outlier_channels`, the same in every RMSNorm) get a norm weight `outlier_gain` times
    larger, so the inputs of the q/k/v and gate/up projections carry activation outliers.
    `dtype` float16 makes every float tensor (weights, activations, graph I/O) half, as a
    float16 export is; `builder` may be an ExternalDataBuilder, which streams the weights to a
    .data file (models/llama_scale.py: a 7B-class decoder). float32 weights draw in float64,
    so the seeded float32 model is what it always was; float16 ones draw in float32 (faster)."""
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    n_rep = heads // kv_heads
    fdt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    b = builder or _Builder()
    outliers, outlier_gain = plant_outliers(rng, hidden, outlier_channels, outlier_gain)

    def normal(shape):
        return rng.standard_normal(shape) if fdt == np.float32 else rng.standard_normal(shape, dtype=np.float32)

    def rms_norm(x, scope, prefix, output=None, big=True):
        w = rng.uniform(0.8, 1.2, hidden)
        if big:
            w[outliers] *= outlier_gain
        t = b.node("Pow", [x, b.const(2.0, fdt)], scope)
        t = b.node("ReduceMean", [t], scope, axes=[-1], keepdims=1)
        t = b.node("Add", [t, b.const(eps, fdt)], scope)
        t = b.node("Sqrt", [t], scope)
        t = b.node("Reciprocal", [t], scope)
        t = b.node("Mul", [x, t], scope)
        return b.node("Mul", [b.init(f"{prefix}.weight", w, fdt), t], scope, output=output)

    def proj(x, scope, prefix, d_in, d_out, gain=1.0, from_norm=True):
        w = normal((d_in, d_out)) * (gain / math.sqrt(d_in))
        if from_norm:  # rows that read the outlier channels are smaller, so pre-activations stay sane
            w[outliers] /= outlier_gain[:, None]
        return b.node("MatMul", [x, b.init(f"{prefix}.weight", w, fdt)], scope)

    def rotate(x, cos, sin, scope):
        """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)."""
        half = head_dim // 2
        last = b.const([-1], np.int64)
        x1 = b.node("Slice", [x, b.const([0], np.int64), b.const([half], np.int64), last], scope)
        x2 = b.node("Slice", [x, b.const([half], np.int64), b.const([INT64_MAX], np.int64), last], scope)
        rot = b.node("Concat", [b.node("Neg", [x2], scope), x1], scope, axis=-1)
        return b.node("Add", [b.node("Mul", [x, cos], scope), b.node("Mul", [rot, sin], scope)], scope)

    h = b.node("Gather", [b.init("model.embed_tokens.weight", normal((vocab, hidden)), fdt), "input_ids"],
               "/model/embed_tokens")

    # -- rotary tables for these positions: [B, S, D]
    cos_np, sin_np = rope_cache(max_pos, head_dim, rope_theta)
    r = "/model/rotary_emb"
    cos = b.node("Gather", [b.init("model.rotary_emb.cos_cached", cos_np, fdt), "position_ids"], r)
    sin = b.node("Gather", [b.init("model.rotary_emb.sin_cached", sin_np, fdt), "position_ids"], r)

    # -- causal + padding mask [B, 1, S, T]: query i (absolute position past+i) sees key j
    #    when j <= past+i and attention_mask[b, j] == 1
    m = "/model"
    one = b.const(1, np.int64)
    total = b.node("Gather", [b.node("Shape", ["attention_mask"], m), one], m, axis=0)
    seq = b.node("Gather", [b.node("Shape", ["input_ids"], m), one], m, axis=0)
    past = b.node("Sub", [total, seq], m)
    q_pos = b.node("Range", [past, total, one], m)                     # [S]
    k_pos = b.node("Range", [b.const(0, np.int64), total, one], m)    # [T]
    q_pos = b.node("Unsqueeze", [q_pos, b.const([1], np.int64)], m)   # [S, 1]
    causal = b.node("LessOrEqual", [k_pos, q_pos], m)                  # [S, T]
    pad = b.node("Unsqueeze", ["attention_mask", b.const([1, 2], np.int64)], m)
    pad = b.node("Cast", [pad], m, to=TensorProto.BOOL)                # [B, 1, 1, T]
    allowed = b.node("And", [causal, pad], m)                          # [B, 1, S, T]
    mask = b.node("Where", [allowed, b.const(0.0, fdt), b.const(float(np.finfo(fdt).min), fdt)], m)

    for i in range(layers):
        p, sd = f"/model/layers.{i}", f"model.layers.{i}"
        x = rms_norm(h, f"{p}/input_layernorm", f"{sd}.input_layernorm")
        a = f"{p}/self_attn"
        q = proj(x, f"{a}/q_proj", f"{sd}.self_attn.q_proj", hidden, heads * head_dim, gain=1.5)
        k = proj(x, f"{a}/k_proj", f"{sd}.self_attn.k_proj", hidden, kv_heads * head_dim, gain=1.5)
        v = proj(x, f"{a}/v_proj", f"{sd}.self_attn.v_proj", hidden, kv_heads * head_dim)
        q = b.node("Transpose", [b.node("Reshape", [q, b.const([0, 0, heads, head_dim], np.int64)], a)], a,
                   perm=[0, 2, 1, 3])                                  # [B, H, S, D]
        k = b.node("Transpose", [b.node("Reshape", [k, b.const([0, 0, kv_heads, head_dim], np.int64)], a)], a,
                   perm=[0, 2, 1, 3])                                  # [B, KV, S, D]
        v = b.node("Transpose", [b.node("Reshape", [v, b.const([0, 0, kv_heads, head_dim], np.int64)], a)], a,
                   perm=[0, 2, 1, 3])
        cos_u = b.node("Unsqueeze", [cos, b.const([1], np.int64)], a)  # [B, 1, S, D]
        sin_u = b.node("Unsqueeze", [sin, b.const([1], np.int64)], a)
        q = rotate(q, cos_u, sin_u, a)
        k = rotate(k, cos_u, sin_u, a)
        k = b.node("Concat", [f"past_key_values.{i}.key", k], a, output=f"present.{i}.key", axis=2)
        v = b.node("Concat", [f"past_key_values.{i}.value", v], a, output=f"present.{i}.value", axis=2)
        # repeat_kv: [B, KV, T, D] -> [B, KV, n_rep, T, D] -> [B, H, T, D] (head h reads kv head h // n_rep)
        rep = b.const([1, 1, n_rep, 1, 1], np.int64)
        to_heads = b.const([0, heads, -1, head_dim], np.int64)
        k = b.node("Reshape", [b.node("Expand", [b.node("Unsqueeze", [k, b.const([2], np.int64)], a), rep], a),
                               to_heads], a)
        v = b.node("Reshape", [b.node("Expand", [b.node("Unsqueeze", [v, b.const([2], np.int64)], a), rep], a),
                               to_heads], a)
        scores = b.node("MatMul", [q, b.node("Transpose", [k], a, perm=[0, 1, 3, 2])], a)
        scores = b.node("Mul", [scores, b.const(1.0 / math.sqrt(head_dim), fdt)], a)
        scores = b.node("Add", [scores, mask], a)
        probs = b.node("Softmax", [scores], a, axis=-1)
        ctx = b.node("MatMul", [probs, v], a)
        ctx = b.node("Transpose", [ctx], a, perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, b.const([0, 0, heads * head_dim], np.int64)], a)
        o = proj(ctx, f"{a}/o_proj", f"{sd}.self_attn.o_proj", heads * head_dim, hidden, from_norm=False)
        h = b.node("Add", [h, o], p)
        x = rms_norm(h, f"{p}/post_attention_layernorm", f"{sd}.post_attention_layernorm")
        mp = f"{p}/mlp"
        gate = proj(x, f"{mp}/gate_proj", f"{sd}.mlp.gate_proj", hidden, intermediate, gain=2.0)
        act = b.node("Mul", [gate, b.node("Sigmoid", [gate], f"{mp}/act_fn")], f"{mp}/act_fn")
        up = proj(x, f"{mp}/up_proj", f"{sd}.mlp.up_proj", hidden, intermediate)
        down = proj(b.node("Mul", [act, up], mp), f"{mp}/down_proj", f"{sd}.mlp.down_proj", intermediate, hidden,
                    from_norm=False)
        h = b.node("Add", [h, down], p)
    x = rms_norm(h, "/model/norm", "model.norm", big=False)
    b.node("MatMul", [x, b.init("lm_head.weight", normal((hidden, vocab)) * (2.0 / math.sqrt(hidden)), fdt)],
           "/lm_head", output="logits")

    f32 = helper.np_dtype_to_tensor_dtype(fdt)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32,
                                                        ["batch", kv_heads, "past_sequence", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32,
                                                         ["batch", kv_heads, "total_sequence", head_dim]))
    graph = helper.make_graph(b.nodes, "llama_block", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcompile-models")
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


def past_names(layers: int = 2) -> list[str]:
    """`past_key_values.{i}.key`, `.value` for each layer, in input order."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def sample_inputs(n: int, seed: int, seq: int = 16, vocab: int = 512, layers: int = 2, kv_heads: int = 2,
                  head_dim: int = 16, pad_fraction: float = 0.5, min_len: int = 4,
                  dtype=np.float32) -> dict[str, np.ndarray]:
    """`n` prefills (past length 0) of token ids in [1, vocab); about `pad_fraction` of
    the rows have a padded tail (mask 0, id PAD_ID=0). position_ids = 0..seq-1. The (empty)
    past arrays are `dtype`, the model's float type."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, seq)).astype(np.int64)
    lengths = np.where(rng.random(n) < pad_fraction, rng.integers(min(min_len, seq), seq, size=n), seq)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = PAD_ID
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy()}
    for name in past_names(layers):
        feeds[name] = np.zeros((n, kv_heads, 0, head_dim), dtype=dtype)
    return feeds


def write(out_dir: str | Path, seed: int = 0, *, layers: int = 2, calib_samples: int = 32,
          eval_samples: int = 64) -> dict[str, Path]:
    return write_with_data(out_dir, "llama_block.onnx", build(seed, layers=layers),
                           lambda n, s: sample_inputs(n, s, layers=layers), seed,
                           calib_samples=calib_samples, eval_samples=eval_samples)


def _session(source):
    import onnxruntime as ort

    if isinstance(source, ort.InferenceSession):
        return source
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    else:
        source = str(source)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def decode(session_or_model_path, prompt_ids, steps: int, *, forced_ids=None) -> np.ndarray:
    """Greedy decoding with the KV cache: a prefill of `prompt_ids` ([batch, prompt] or
    [prompt]) with empty past, then one-token steps that feed `present.*` back as
    `past_key_values.*`.

    Returns the next-token logits of every step, [batch, steps, vocab] float32: step 0
    is the prefill's last position, step k >= 1 the k-th one-token decode step (so
    steps-1 decode calls). The token fed at step k is argmax(logits[:, k-1]), or
    `forced_ids[:, k-1]` when `forced_ids` ([batch, >= steps-1]) is given: forcing the
    same tokens lets a quantized model be compared with the float one step by step even
    where their greedy choices differ. `session_or_model_path`: an onnxruntime
    InferenceSession, a model path, or a ModelProto (run on the CPU provider); the
    model must keep the dynamic sequence/past axes."""
    if steps < 1:
        raise ValueError("steps must be >= 1 (step 0 is the prefill)")
    sess = _session(session_or_model_path)
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    batch, length = ids.shape
    if forced_ids is not None:
        forced_ids = np.asarray(forced_ids, dtype=np.int64).reshape(batch, -1)
        if forced_ids.shape[1] < steps - 1:
            raise ValueError(f"forced_ids has {forced_ids.shape[1]} tokens per row, {steps - 1} needed")
    past = {}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            kv_heads, head_dim = inp.shape[1], inp.shape[3]
            if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
                raise ValueError(f"{inp.name} has shape {inp.shape}: kv_heads and head_dim must be fixed")
            dtype = np.int8 if inp.type == "tensor(int8)" else np.float32  # an int8 KV cache (kv_cache pass)
            past[inp.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
    out_names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, length), dtype=np.int64),
             "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy(), **past}
    logits = []
    for step in range(steps):
        outs = dict(zip(out_names, sess.run(None, feeds)))
        last = np.asarray(outs["logits"][:, -1, :], dtype=np.float32)
        logits.append(last)
        if step == steps - 1:
            break
        token = forced_ids[:, step] if forced_ids is not None else last.argmax(axis=-1)
        total = feeds["attention_mask"].shape[1]
        feeds = {"input_ids": token.astype(np.int64)[:, None],
                 "attention_mask": np.ones((batch, total + 1), dtype=np.int64),
                 "position_ids": np.full((batch, 1), total, dtype=np.int64)}
        for name in past:
            feeds[name] = outs[name.replace("past_key_values.", "present.", 1)]
    return np.stack(logits, axis=1)


if __name__ == "__main__":
    for kind, path in write(sys.argv[1] if len(sys.argv) > 1 else "build/llama_block").items():
        print(f"{kind}: {path}")
