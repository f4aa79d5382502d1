"""Attention over an int8 KV cache as one generated kernel (backends/cpu/kv_cache_attention.py,
backends/cpu/kernels/QAttentionKVCache.cpp.j2).

The kernel is checked against an independent numpy reference (float64 attention over the
dequantized cache): the present cache it writes exactly, the attention output to a tight
tolerance (its softmax and dot products run in fp32, in another order). The grid covers
grouped-query ratios (1, 2, 3, 8), head dims that are no multiple of the vector width, past
length 0 and a long past, prefill blocks, both bias broadcasts and no bias, both cache codecs,
on every ISA path this machine runs. End to end: the seeded Llama block compiled with
`w8a8-kv8` decodes like its standard-op form, and the kernel agrees with the reference on the
inputs that decode feeds it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernel_harness import ONLY_THIS_OP, attention_float64, library_session, runnable_paths, session
from qcompile.backends.cpu.generated_kernels import TEMPLATES
from qcompile.driver import compile_model
from qcompile.kernelgen import KernelSpec
from qcompile.kernelgen.build import LIBRARY, build
from qcompile.kernelgen.ort_headers import find_headers
from qcompile.kernelgen.render import render_sources

# (head_dim, q_heads, kv_heads, cache codec, attention bias)
GRID = [(64, 9, 3, "per_channel", True),    # SmolLM2-135M's geometry
        (16, 4, 2, "per_head", True),       # the seeded Llama block's
        (13, 4, 4, "per_head", False),      # no grouping, a head dim of odd length, no bias
        (40, 8, 1, "per_channel", True)]    # multi-query, 40 = 2 x 16 + 8
# (batch, new positions, past positions, bias layout: "batch" = [B, 1, S, T], "heads" = [1, QH, S, T])
CALLS = [(1, 1, 0, "batch"), (1, 1, 300, "batch"), (2, 5, 7, "batch"), (1, 37, 0, "heads"), (2, 3, 20, "heads")]


def attention_spec(head_dim, q_heads, kv_heads, layout, bias) -> KernelSpec:
    return KernelSpec(op="QAttentionKVCache", family="cpu", isa="avx512_vnni",
                      dtypes=(("query", "float32"), ("cache", "int8"), ("output", "float32")),
                      static_dims=(("head_dim", head_dim), ("q_heads", q_heads), ("kv_heads", kv_heads)),
                      dynamic_dims=("batch", "seq", "past"), scale_layout=layout,
                      epilogue="attention_bias" if bias else "")


def reference(q, k, v, past_k, past_v, k_scale, v_scale, bias, softmax_scale, q_heads):
    """present = concat(past, round(new / s)) saturated to int8; attention in float64 over the
    dequantized present, KV heads repeated to the query heads."""
    batch, seq, _ = q.shape
    kv_heads, d = k.shape[1], k.shape[3]
    ks = np.broadcast_to(k_scale.reshape(1, kv_heads, 1, -1), (1, kv_heads, 1, d)).astype(np.float32)
    vs = np.broadcast_to(v_scale.reshape(1, kv_heads, 1, -1), (1, kv_heads, 1, d)).astype(np.float32)
    present_k = np.concatenate([past_k, np.clip(np.round(k / ks), -128, 127).astype(np.int8)], axis=2)
    present_v = np.concatenate([past_v, np.clip(np.round(v / vs), -128, 127).astype(np.int8)], axis=2)
    group = q_heads // kv_heads
    keys = np.repeat(present_k.astype(np.float64) * ks, group, axis=1)
    values = np.repeat(present_v.astype(np.float64) * vs, group, axis=1)
    query = q.astype(np.float64).reshape(batch, seq, q_heads, d).transpose(0, 2, 1, 3)
    return attention_float64(query, keys, values, bias, softmax_scale), present_k, present_v


def one_node_model(spec: KernelSpec, k_scale, v_scale, softmax_scale: float, bias: bool) -> bytes:
    names = ["q", "k", "v", "past_k", "past_v", "k_scale", "v_scale"] + (["bias"] if bias else [])
    node = helper.make_node("QAttentionKVCache", names, ["out", "present_k", "present_v"], domain="com.qcompile",
                            spec=spec.id, scale=softmax_scale)
    types = {"q": 1, "k": 1, "v": 1, "past_k": 3, "past_v": 3, "bias": 1}
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, types[n], None) for n in names if n in types],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present_k", TensorProto.INT8, None),
         helper.make_tensor_value_info("present_v", TensorProto.INT8, None)],
        [numpy_helper.from_array(k_scale, "k_scale"), numpy_helper.from_array(v_scale, "v_scale")])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("com.qcompile", 1)]
                             ).SerializeToString()


def scales(rng, kv_heads, head_dim, layout):
    shape = (kv_heads,) if layout == "per_head" else (1, kv_heads, 1, head_dim)
    return tuple((rng.random(shape) * 0.05 + 0.005).astype(np.float32) for _ in range(2))


@pytest.fixture(scope="module")
def grid_library():
    return build(render_sources(TEMPLATES, [attention_spec(*g) for g in GRID], "test"), find_headers()).path


def _feeds(rng, g, call, k_scale, v_scale):
    head_dim, q_heads, kv_heads, _, with_bias = g
    batch, seq, past, bias_layout = call
    total = past + seq
    feeds = {"q": rng.standard_normal((batch, seq, q_heads * head_dim)).astype(np.float32),
             "past_k": rng.integers(-128, 128, (batch, kv_heads, past, head_dim)).astype(np.int8),
             "past_v": rng.integers(-128, 128, (batch, kv_heads, past, head_dim)).astype(np.int8)}
    for name, scale in (("k", k_scale), ("v", v_scale)):   # ~3 % of new values past the calibrated range
        s = np.broadcast_to(scale.reshape(1, kv_heads, 1, -1), (1, kv_heads, 1, head_dim))
        feeds[name] = (rng.standard_normal((batch, kv_heads, seq, head_dim)) * 60 * s).astype(np.float32)
    if with_bias:   # a causal mask as Hugging Face writes it (finfo.min), plus some noise
        shape = (batch, 1, seq, total) if bias_layout == "batch" else (1, q_heads, seq, total)
        causal = np.arange(total)[None, :] > (past + np.arange(seq))[:, None]
        bias = rng.standard_normal(shape).astype(np.float32) * 0.5
        bias[..., causal] = np.finfo(np.float32).min
        feeds["bias"] = bias
    return feeds


@pytest.mark.parametrize("path", runnable_paths())
@pytest.mark.parametrize("g", GRID, ids=lambda g: f"d{g[0]}-h{g[1]}-kv{g[2]}-{g[3]}{'' if g[4] else '-nobias'}")
def test_attention_over_an_int8_cache_equals_numpy(grid_library, monkeypatch, path, g):
    head_dim, q_heads, kv_heads, layout, with_bias = g
    rng = np.random.default_rng(head_dim * 100 + q_heads)
    k_scale, v_scale = scales(rng, kv_heads, head_dim, layout)
    softmax_scale = float(1 / np.sqrt(head_dim))
    sess = session(one_node_model(attention_spec(*g), k_scale, v_scale, softmax_scale, with_bias), grid_library,
                   path, monkeypatch)
    for call in CALLS:
        feeds = _feeds(rng, g, call, k_scale, v_scale)
        out, present_k, present_v = sess.run(None, feeds)
        want, want_k, want_v = reference(feeds["q"], feeds["k"], feeds["v"], feeds["past_k"], feeds["past_v"],
                                         k_scale, v_scale, feeds.get("bias"), softmax_scale, q_heads)
        np.testing.assert_array_equal(present_k, want_k, err_msg=f"{path} {call}")
        np.testing.assert_array_equal(present_v, want_v, err_msg=f"{path} {call}")
        assert out.shape == want.shape
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-6 * np.abs(want).max(), err_msg=f"{path} {call}")
        fresh = present_k[:, :, call[2]:].astype(np.int32)
        assert (fresh == -128).any() and (fresh == 127).any() or fresh.size < 1000   # saturation was exercised


def test_shapes_the_spec_does_not_have_are_refused(grid_library, monkeypatch):
    g = GRID[1]
    rng = np.random.default_rng(0)
    k_scale, v_scale = scales(rng, g[2], g[0], g[3])
    sess = session(one_node_model(attention_spec(*g), k_scale, v_scale, 0.25, True), grid_library, "scalar",
                   monkeypatch)
    feeds = _feeds(rng, g, (1, 2, 3, "batch"), k_scale, v_scale)
    feeds["past_k"] = feeds["past_k"][:, :, :2]
    with pytest.raises(Exception, match=r"past_value has shape \[1, 2, 3, 16\], not \[1, 2, 2, 16\]"):
        sess.run(None, feeds)
    feeds = _feeds(rng, g, (1, 2, 3, "batch"), k_scale, v_scale)
    feeds["bias"] = feeds["bias"][..., :4]
    with pytest.raises(Exception, match=r"attention_bias has shape \[1, 1, 2, 4\], not \[1 or 1, 1 or 4, 2, 5\]"):
        sess.run(None, feeds)
    wrong = one_node_model(attention_spec(*g), np.ones(3, np.float32), np.ones(3, np.float32), 0.25, True)
    with pytest.raises(Exception, match="a cache scale does not have the 2 values spec"):
        session(wrong, grid_library, "scalar", monkeypatch)


# -- the lowering, end to end on the seeded Llama block -----------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from models import llama_block
    return llama_block.write(tmp_path_factory.mktemp("llama"))


def _compile(llama, out, granularity="per_channel", settings=()):
    return compile_model(llama["model"], target="cpu", recipe="w8a8-kv8", calib=llama["calib"],
                         verify_data=llama["eval"], output_dir=out, progress=False, verify_samples=16,
                         settings=(f"kv_cache.granularity={granularity}",) + ONLY_THIS_OP + tuple(settings))


def _decode_outputs(model_path, library, prompt, steps):
    """Every output of a prefill and `steps` greedy one-token steps, the cache fed back."""
    sess = library_session(model_path, library)
    names = [o.name for o in sess.get_outputs()]
    pasts = {i.name: (i.shape[1], i.shape[3]) for i in sess.get_inputs() if i.name.startswith("past")}
    total = prompt.shape[1]
    feeds = {"input_ids": prompt, "attention_mask": np.ones((1, total), np.int64),
             "position_ids": np.arange(total, dtype=np.int64)[None]}
    feeds.update({n: np.zeros((1, h, 0, d), np.int8) for n, (h, d) in pasts.items()})
    runs = []
    for _ in range(steps + 1):
        outs = dict(zip(names, sess.run(None, feeds)))
        runs.append(outs)
        token = outs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = {"input_ids": token, "attention_mask": np.ones((1, total + 1), np.int64),
                 "position_ids": np.full((1, 1), total, np.int64)}
        feeds.update({n: outs[n.replace("past_key_values", "present")] for n in pasts})
        total += 1
    return runs


@pytest.mark.parametrize("granularity", ["per_channel", "per_head"])
def test_w8a8_kv8_decodes_through_the_generated_attention(llama, tmp_path, granularity):
    result = _compile(llama, tmp_path / "kernels", granularity)
    standard = _compile(llama, tmp_path / "standard", granularity, ("generate_kernels.enabled=false",))
    out = tmp_path / "kernels"
    model = onnx.load(out / "model.onnx")
    generated = [n for n in model.graph.node if n.op_type == "QAttentionKVCache"]
    assert len(generated) == 2 and all(n.domain == "com.qcompile" for n in generated)
    assert not any(n.op_type in ("MultiHeadAttention", "Concat", "Expand") for n in model.graph.node)
    assert not any(inp.startswith("past") for n in model.graph.node if n.op_type != "QAttentionKVCache"
                   for inp in n.input), "the int8 past is read by the kernel only"
    section = result.report["generated_kernels"]
    assert section["built"] and section["kernels"] == 1 and section["ops"]["QAttentionKVCache"] == sorted(
        n.name for n in generated)
    prompt = np.random.default_rng(1).integers(1, 512, (1, 12), dtype=np.int64)
    got = _decode_outputs(out / "model.onnx", out / "kernels" / LIBRARY, prompt, 12)
    want = _decode_outputs(tmp_path / "standard" / "model.onnx", None, prompt, 12)
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            if name.startswith("present"):    # the int8 cache: bit for bit
                np.testing.assert_array_equal(g[name], w[name], err_msg=f"step {step} {name}")
            else:
                np.testing.assert_allclose(g[name], w[name], rtol=1e-4, atol=1e-4 * np.abs(w[name]).max(),
                                           err_msg=f"step {step} {name}")
    assert result.worst_output("sqnr_db") == pytest.approx(standard.worst_output("sqnr_db"), abs=0.05)


def test_the_kernel_on_the_inputs_decode_feeds_it(llama, tmp_path, monkeypatch):
    """Layer 0's attention inputs, captured from the compiled model at a decode step with a
    past, through the kernel on every path, against the numpy reference."""
    _compile(llama, tmp_path / "out")
    out = tmp_path / "out"
    model = onnx.load(out / "model.onnx")
    node = next(n for n in model.graph.node if n.op_type == "QAttentionKVCache")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    captured = [i for i in node.input if i not in inits]
    graph_inputs = {i.name for i in model.graph.input}
    for name in captured:
        if name not in graph_inputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = tmp_path / "probe.onnx"
    onnx.save(model, probe)
    prompt = np.random.default_rng(2).integers(1, 512, (1, 9), dtype=np.int64)
    runs = _decode_outputs(probe, out / "kernels" / LIBRARY, prompt, 3)
    feeds = {name: runs[-2][name.replace("past_key_values", "present")] if name in graph_inputs else runs[-1][name]
             for name in captured}
    assert feeds[node.input[3]].shape[2] == 11        # past: 9 prompt tokens + 2 steps
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k_scale, v_scale = inits[node.input[5]], inits[node.input[6]]
    want, want_k, want_v = reference(*(feeds[n] for n in node.input[:5]), k_scale, v_scale,
                                     feeds.get(node.input[7]) if len(node.input) > 7 else None, attrs["scale"],
                                     q_heads=4)
    head_dim, kv_heads = want_k.shape[3], want_k.shape[1]
    spec = attention_spec(head_dim, 4, kv_heads, "per_channel", len(node.input) > 7)
    assert spec.id == attrs["spec"].decode()
    library = build(render_sources(TEMPLATES, [spec], "test"), find_headers()).path
    for path in runnable_paths():
        sess = session(one_node_model(spec, k_scale, v_scale, attrs["scale"], len(node.input) > 7), library, path,
                       monkeypatch)
        names = ["q", "k", "v", "past_k", "past_v"] + (["bias"] if len(node.input) > 7 else [])
        got, got_k, got_v = sess.run(None, dict(zip(names, (feeds[n] for n in captured))))
        np.testing.assert_array_equal(got_k, want_k, err_msg=path)
        np.testing.assert_array_equal(got_v, want_v, err_msg=path)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max(), err_msg=path)


def test_without_a_compiler_the_int8_cache_keeps_the_standard_op_form(llama, tmp_path, monkeypatch):
    from qcompile.kernelgen.ort_headers import find_headers as headers
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(headers().include_dir))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "empty-cache"))
    result = _compile(llama, tmp_path / "out")
    model = onnx.load(tmp_path / "out" / "model.onnx")
    assert sum(n.op_type == "MultiHeadAttention" for n in model.graph.node) == 2
    assert not any(n.domain == "com.qcompile" for n in model.graph.node)
    warnings = [w for w in result.report["warnings"] if "generated kernels not built" in w]
    assert len(warnings) == 1 and "2× attention over an int8 KV cache stay in the standard-op form" in warnings[0]
