"""The seeded transformer builders (models/bert_block.py, models/llama_block.py) checked
against independent numpy forwards written here from the models' initializers, plus the
KV-cache consistency of the Llama decoder (prefill vs prefill + decode steps)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from numpy.testing import assert_allclose
from onnx import numpy_helper

from conftest import ort_session
from models import bert_block, llama_block

RTOL, ATOL = 1e-4, 1e-5
# The BERT output carries outlier channels of +-50 (by design); float32 rounding through
# a layer (peaky softmax, large residual branches) then leaves ~1e-6 of that scale, i.e.
# up to ~7e-5 absolute on near-zero entries. So its atol is ATOL times the output scale
# (about 5e-4); any wiring bug is off by O(1).


def bert_atol(want):
    return ATOL * max(1.0, float(np.abs(want).max()))
NEG = np.finfo(np.float32).min  # the additive mask value transformers uses

_erf = np.vectorize(math.erf, otypes=[np.float64])


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) if t.data_type == onnx.TensorProto.FLOAT
            else numpy_helper.to_array(t) for t in model.graph.initializer}


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def run(model, feeds):
    sess = ort_session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# -- BERT -------------------------------------------------------------------------------------
def bert_numpy(w, ids, mask, heads, eps=1e-12):
    """The encoder in float64: HF BertModel semantics (token type 0, positions 0..S-1)."""
    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def dense(x, prefix):
        return x @ w[prefix + ".weight"] + w[prefix + ".bias"]

    B, S = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
         + w["embeddings.position_embeddings.weight"][:S])
    x = ln(x, "embeddings.LayerNorm")
    hidden = x.shape[-1]
    D = hidden // heads
    additive = np.where(mask[:, None, None, :] != 0, 0.0, NEG)
    n_layers = len({k.split(".")[2] for k in w if k.startswith("encoder.layer.")})
    for i in range(n_layers):
        p = f"encoder.layer.{i}"

        def split(t):
            return t.reshape(B, S, heads, D).transpose(0, 2, 1, 3)

        q, k, v = (split(dense(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        probs = softmax(np.einsum("bhsd,bhtd->bhst", q, k) / math.sqrt(D) + additive)
        ctx = np.einsum("bhst,bhtd->bshd", probs, v).reshape(B, S, hidden)
        x = ln(dense(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        f = dense(x, f"{p}.intermediate.dense")
        f = 0.5 * f * (1.0 + _erf(f / math.sqrt(2.0)))
        x = ln(dense(f, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


@pytest.fixture(scope="module")
def bert():
    return bert_block.build(seed=0)


def test_bert_matches_numpy(bert):
    w = weights(bert)
    feeds_list = [bert_block.sample_inputs(4, seed=11, seq=16, pad_fraction=1.0),
                  bert_block.sample_inputs(3, seed=12, seq=7, pad_fraction=0.5, min_len=2)]
    for feeds in feeds_list:
        assert (feeds["attention_mask"] == 0).any()  # padded tails are exercised
        got = run(bert, feeds)["last_hidden_state"]
        assert got.shape == (*feeds["input_ids"].shape, 64) and got.dtype == np.float32
        want = bert_numpy(w, feeds["input_ids"], feeds["attention_mask"], heads=4)
        assert_allclose(got, want, rtol=RTOL, atol=bert_atol(want))


def test_bert_other_config_matches_numpy():
    model = bert_block.build(seed=3, vocab=50, hidden=32, heads=2, layers=1, intermediate=48, max_pos=20)
    feeds = bert_block.sample_inputs(2, seed=5, seq=20, vocab=50, pad_fraction=1.0)
    got = run(model, feeds)["last_hidden_state"]
    want = bert_numpy(weights(model), feeds["input_ids"], feeds["attention_mask"], heads=2)
    assert_allclose(got, want, rtol=RTOL, atol=bert_atol(want))


def assert_exporter_spelling(model, names: list[str]) -> None:
    """Opset 17 / IR 8 as the exporters write, and nodes named as they name them."""
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    present = {n.name for n in model.graph.node}
    for name in names:
        assert name in present, name


def test_bert_graph_spelling(bert):
    assert_exporter_spelling(bert, [
        "/embeddings/word_embeddings/Gather", "/embeddings/LayerNorm/LayerNormalization",
        "/encoder/layer.0/attention/self/query/MatMul", "/encoder/layer.0/attention/self/key/Add",
        "/encoder/layer.0/attention/self/Softmax", "/encoder/layer.0/attention/output/dense/MatMul",
        "/encoder/layer.0/intermediate/dense/MatMul", "/encoder/layer.0/intermediate/intermediate_act_fn/Erf",
        "/encoder/layer.1/output/dense/MatMul", "/encoder/layer.1/output/LayerNorm/LayerNormalization"])
    ops = [n.op_type for n in bert.graph.node]
    assert ops.count("MatMul") == 2 * 8 and ops.count("Erf") == 2 and ops.count("Softmax") == 2
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*bert.graph.input, *bert.graph.output]}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                    "last_hidden_state": ["batch", "sequence", 64]}
    where = next(n for n in bert.graph.node if n.op_type == "Where")
    inits = {t.name: numpy_helper.to_array(t) for t in bert.graph.initializer}
    assert float(inits[where.input[2]]) == -3.4028234663852886e38
    # activation outliers: a few LayerNorm gammas 10-20x the rest
    gamma = inits["encoder.layer.0.output.LayerNorm.weight"]
    big = gamma > 5
    assert 1 <= big.sum() <= 4 and gamma[big].min() / np.median(gamma) >= 8


def test_bert_write(tmp_path):
    paths = bert_block.write(tmp_path / "a")
    again = bert_block.write(tmp_path / "b")
    sess = ort_session(paths["model"])
    for kind, n in (("calib", 32), ("eval", 64)):
        with np.load(paths[kind]) as data, np.load(again[kind]) as data2:
            assert sorted(data.files) == ["attention_mask", "input_ids"]
            ids, mask = data["input_ids"], data["attention_mask"]
            assert ids.shape == mask.shape == (n, 16) and ids.dtype == mask.dtype == np.int64
            assert (ids[mask == 1] >= 1).all() and (ids < 1000).all()
            assert (mask[:, 0] == 1).all() and (mask == 0).any()
            assert (np.diff(mask, axis=1) <= 0).all()  # padding only at the tail
            assert all(np.array_equal(data[k], data2[k]) for k in data.files)  # deterministic
            out = sess.run(None, {"input_ids": ids[:4], "attention_mask": mask[:4]})[0]
            assert np.isfinite(out).all()


# -- Llama ------------------------------------------------------------------------------------
CFG = dict(heads=4, kv_heads=2, head_dim=16, theta=10000.0, eps=1e-6)


def llama_numpy(w, ids, mask, pos, past, heads, kv_heads, head_dim, theta, eps):
    """The decoder in float64. `past`: {layer: (k, v)} [B, KV, P, D]. Returns logits and
    presents {layer: (k, v)}."""
    def rms(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[name + ".weight"]

    def rope(x, cos, sin):
        half = head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    B, S = ids.shape
    T = mask.shape[1]
    P = T - S
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    ang = pos[..., None] * inv_freq                      # [B, S, D/2]
    ang = np.concatenate([ang, ang], axis=-1)[:, None]   # [B, 1, S, D]
    cos, sin = np.cos(ang), np.sin(ang)
    q_abs = P + np.arange(S)
    allowed = (np.arange(T)[None, :] <= q_abs[:, None])[None, None] & (mask[:, None, None, :] != 0)
    additive = np.where(allowed, 0.0, NEG)
    x = w["model.embed_tokens.weight"][ids]
    n_layers = len({k.split(".")[2] for k in w if k.startswith("model.layers.")})
    presents = {}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        h = rms(x, f"{p}.input_layernorm")
        q = (h @ w[f"{p}.self_attn.q_proj.weight"]).reshape(B, S, heads, head_dim).transpose(0, 2, 1, 3)
        k = (h @ w[f"{p}.self_attn.k_proj.weight"]).reshape(B, S, kv_heads, head_dim).transpose(0, 2, 1, 3)
        v = (h @ w[f"{p}.self_attn.v_proj.weight"]).reshape(B, S, kv_heads, head_dim).transpose(0, 2, 1, 3)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k = np.concatenate([past[i][0], k], axis=2)
        v = np.concatenate([past[i][1], v], axis=2)
        presents[i] = (k, v)
        out = np.empty((B, heads, S, head_dim))
        for hd in range(heads):  # query head hd reads kv head hd // (heads // kv_heads)
            g = hd // (heads // kv_heads)
            probs = softmax(q[:, hd] @ k[:, g].transpose(0, 2, 1) / math.sqrt(head_dim) + additive[:, 0])
            out[:, hd] = probs @ v[:, g]
        x = x + out.transpose(0, 2, 1, 3).reshape(B, S, heads * head_dim) @ w[f"{p}.self_attn.o_proj.weight"]
        h = rms(x, f"{p}.post_attention_layernorm")
        gate = h @ w[f"{p}.mlp.gate_proj.weight"]
        up = h @ w[f"{p}.mlp.up_proj.weight"]
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[f"{p}.mlp.down_proj.weight"]
    logits = rms(x, "model.norm") @ w["lm_head.weight"]
    return logits, presents


def llama_feeds(ids, mask=None, pos=None, past=None, layers=2, kv_heads=2, head_dim=16):
    B, S = ids.shape
    P = 0 if past is None else past[0][0].shape[2]
    mask = np.ones((B, P + S), np.int64) if mask is None else mask
    pos = np.broadcast_to(np.arange(P, P + S, dtype=np.int64), (B, S)).copy() if pos is None else pos
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(layers):
        k, v = past[i] if past is not None else (np.zeros((B, kv_heads, 0, head_dim), np.float32),) * 2
        feeds[f"past_key_values.{i}.key"] = k.astype(np.float32)
        feeds[f"past_key_values.{i}.value"] = v.astype(np.float32)
    return feeds


def presents_of(out, layers=2):
    return {i: (out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(layers)}


@pytest.fixture(scope="module")
def llama():
    return llama_block.build(seed=0)


def test_llama_prefill_matches_numpy(llama):
    w = weights(llama)
    for n, seq, seed in ((4, 16, 21), (3, 5, 22)):
        feeds = llama_block.sample_inputs(n, seed=seed, seq=seq, pad_fraction=1.0, min_len=2)
        assert (feeds["attention_mask"] == 0).any()
        out = run(llama, feeds)
        zero_past = {i: (feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"]) for i in range(2)}
        logits, presents = llama_numpy(w, feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"],
                                       zero_past, **CFG)
        assert out["logits"].shape == (n, seq, 512)
        assert_allclose(out["logits"], logits, rtol=RTOL, atol=ATOL)
        for i in range(2):
            assert_allclose(out[f"present.{i}.key"], presents[i][0], rtol=RTOL, atol=ATOL)
            assert_allclose(out[f"present.{i}.value"], presents[i][1], rtol=RTOL, atol=ATOL)


def test_llama_decode_step_with_padded_past_matches_numpy(llama):
    """A one-token step over a past whose mask has zeros (a padded prompt)."""
    w = weights(llama)
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 512, (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0  # row 1: a 4-token prompt padded to 6
    prefill = run(llama, llama_feeds(ids, mask))
    past = presents_of(prefill)
    step_ids = rng.integers(1, 512, (2, 1)).astype(np.int64)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    pos = np.array([[6], [4]], np.int64)  # row 1 continues at position 4
    out = run(llama, llama_feeds(step_ids, step_mask, pos, past))
    logits, presents = llama_numpy(w, step_ids, step_mask, pos, {i: tuple(a.astype(np.float64) for a in past[i])
                                                                   for i in past}, **CFG)
    assert_allclose(out["logits"], logits, rtol=RTOL, atol=ATOL)
    for i in range(2):
        assert_allclose(out[f"present.{i}.key"], presents[i][0], rtol=RTOL, atol=ATOL)


def test_llama_kv_cache_consistency(llama):
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 512, (2, 6)).astype(np.int64)
    full = run(llama, llama_feeds(ids))
    first = run(llama, llama_feeds(ids[:, :5]))
    step = run(llama, llama_feeds(ids[:, 5:], past=presents_of(first)))
    assert step["logits"].shape == (2, 1, 512)
    assert_allclose(step["logits"][:, 0], full["logits"][:, -1], rtol=RTOL, atol=ATOL)
    assert_allclose(first["logits"], full["logits"][:, :5], rtol=RTOL, atol=ATOL)
    for i in range(2):
        for kind in ("key", "value"):
            assert_allclose(step[f"present.{i}.{kind}"], full[f"present.{i}.{kind}"], rtol=RTOL, atol=ATOL)


def test_llama_gqa_shapes(llama):
    ids = np.ones((3, 4), np.int64)
    prefill = run(llama, llama_feeds(ids))
    step = run(llama, llama_feeds(ids[:, :1], past=presents_of(prefill)))
    for i in range(2):
        for kind in ("key", "value"):
            assert prefill[f"present.{i}.{kind}"].shape == (3, 2, 4, 16)   # kv_heads, not heads
            assert step[f"present.{i}.{kind}"].shape == (3, 2, 5, 16)
    w = weights(llama)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 4 * 16)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (64, 2 * 16)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*llama.graph.input, *llama.graph.output]}
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert dims["logits"] == ["batch", "sequence", 512]
    assert dims["attention_mask"] == ["batch", "total_sequence"]


def test_llama_graph_spelling(llama):
    assert_exporter_spelling(llama, [
        "/model/embed_tokens/Gather", "/model/layers.0/input_layernorm/ReduceMean",
        "/model/layers.0/self_attn/q_proj/MatMul", "/model/layers.0/self_attn/Expand",
        "/model/layers.0/self_attn/Neg", "/model/layers.1/mlp/down_proj/MatMul",
        "/model/layers.1/mlp/act_fn/Sigmoid", "/model/norm/Sqrt", "/lm_head/MatMul"])
    w = weights(llama)
    cos, sin = llama_block.rope_cache(256, 16, 10000.0)
    assert_allclose(w["model.rotary_emb.cos_cached"], cos) and assert_allclose(w["model.rotary_emb.sin_cached"], sin)


def test_llama_decode_helper(llama):
    prompt = np.array([[5, 17, 300, 41, 9], [8, 8, 200, 100, 77]], np.int64)
    logits = llama_block.decode(llama, prompt, steps=4)
    assert logits.shape == (2, 4, 512) and logits.dtype == np.float32
    tokens = logits.argmax(-1)
    # step k's logits are the last-position logits of a fresh prefill over prompt + k generated tokens
    for k in range(4):
        seq = np.concatenate([prompt, tokens[:, :k]], axis=1)
        assert_allclose(logits[:, k], run(llama, llama_feeds(seq))["logits"][:, -1], rtol=RTOL, atol=ATOL)
    forced = np.array([[1, 2, 3], [4, 5, 6]])
    forced_logits = llama_block.decode(llama, prompt, steps=4, forced_ids=forced)
    seq = np.concatenate([prompt, forced], axis=1)
    assert_allclose(forced_logits, run(llama, llama_feeds(seq))["logits"][:, -4:], rtol=RTOL, atol=ATOL)
    single = llama_block.decode(llama, prompt[0], steps=2)
    assert_allclose(single[0], logits[0, :2], rtol=RTOL, atol=ATOL)


def test_llama_write(tmp_path):
    paths = llama_block.write(tmp_path)
    sess = ort_session(paths["model"])
    for kind, n in (("calib", 32), ("eval", 64)):
        with np.load(paths[kind]) as data:
            assert set(data.files) == {i.name for i in sess.get_inputs()}
            assert data["past_key_values.0.key"].shape == (n, 2, 0, 16)
            assert data["input_ids"].shape == data["attention_mask"].shape == data["position_ids"].shape == (n, 16)
            mask = data["attention_mask"]
            assert (mask == 0).any() and (mask[:, 0] == 1).all()
            feeds = {k: data[k][:4] for k in data.files}
            out = sess.run(None, feeds)
            assert out[0].shape == (4, 16, 512) and np.isfinite(out[0]).all()
