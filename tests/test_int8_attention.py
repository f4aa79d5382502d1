"""FA3 int8 attention as one generated kernel (backends/cpu/int8_attention.py,
backends/cpu/kernels/QAttentionInt8.cpp.j2).

The kernel against an independent numpy reference (QuantizeLinear's int8 Q/K/V, then float64
attention over the dequantized values) to a tight tolerance — its Q·K products of int8 values
are exact, its softmax is fp32 (a polynomial exp on the vector paths) — over head dims that are
no multiple of the vector width, query/key lengths that are no multiple of the tiles, cross
attention (kv length ≠ query length), both bias broadcasts, no bias, per-head and per-tensor
scales and saturating inputs, on every ISA path this machine runs. End to end: the seeded BERT
block compiled with `w8a8-fa3` against its standard-op form in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernel_harness import ONLY_THIS_OP, attention_float64, run_compiled, runnable_paths, session
from qcompile.backends.cpu.generated_kernels import TEMPLATES
from qcompile.driver import compile_model
from qcompile.kernelgen import KernelSpec
from qcompile.kernelgen.build import LIBRARY, build
from qcompile.kernelgen.ort_headers import find_headers
from qcompile.kernelgen.render import render_sources

# (head_dim, heads, bias)
GRID = [(32, 12, True), (16, 4, True), (13, 3, False), (64, 2, True)]
# (batch, seq, kv_seq, bias layout)
CALLS = [(1, 1, 1, "batch"), (1, 5, 7, "heads"), (2, 70, 70, "batch"), (1, 3, 130, "heads"), (3, 17, 9, "batch")]


def int8_spec(head_dim, heads, bias, layout="per_head") -> KernelSpec:
    return KernelSpec(op="QAttentionInt8", family="cpu", isa="avx512_vnni",
                      dtypes=(("query", "float32"), ("qkv", "int8"), ("output", "float32")),
                      static_dims=(("head_dim", head_dim), ("heads", heads)), dynamic_dims=("batch", "seq", "kv_seq"),
                      scale_layout=layout, epilogue="attention_bias" if bias else "")


def reference(q, k, v, q_scale, k_scale, v_scale, bias, softmax_scale, heads):
    """int8 Q/K/V as QuantizeLinear makes them (round half to even, saturated), float64 attention."""
    d = q.shape[2] // heads

    def deq(x, s):
        per = np.repeat(np.broadcast_to(s.reshape(-1), (heads,)), d).astype(np.float32)
        x8 = np.clip(np.round(x / per), -128, 127)
        return (x8 * per).astype(np.float64).reshape(x.shape[0], x.shape[1], heads, d).transpose(0, 2, 1, 3)

    return attention_float64(deq(q, q_scale), deq(k, k_scale), deq(v, v_scale), bias, softmax_scale)


def one_node_model(spec, scales, softmax_scale, bias) -> bytes:
    names = ["q", "k", "v", "q_scale", "k_scale", "v_scale"] + (["bias"] if bias else [])
    node = helper.make_node("QAttentionInt8", names, ["out"], domain="com.qcompile", spec=spec.id, scale=softmax_scale)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if "scale" not in n],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(s, n) for s, n in zip(scales, ("q_scale", "k_scale", "v_scale"))])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("com.qcompile", 1)]
                             ).SerializeToString()


@pytest.fixture(scope="module")
def grid_library():
    specs = [int8_spec(*g) for g in GRID] + [int8_spec(16, 4, True, "per_tensor")]
    return build(render_sources(TEMPLATES, specs, "test"), find_headers()).path


def _feeds(rng, heads, width, call, with_bias):
    batch, seq, kv_seq, layout = call
    feeds = {"q": rng.standard_normal((batch, seq, width)).astype(np.float32),
             "k": rng.standard_normal((batch, kv_seq, width)).astype(np.float32),
             "v": rng.standard_normal((batch, kv_seq, width)).astype(np.float32)}
    if with_bias:
        shape = (batch, 1, seq, kv_seq) if layout == "batch" else (1, heads, seq, kv_seq)
        bias = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        bias[rng.random(shape) < 0.3] = np.finfo(np.float32).min      # masked keys, as an exporter writes them
        bias[..., 0] = 0.0                                             # never a fully masked row
        feeds["bias"] = bias
    return feeds


@pytest.mark.parametrize("path", runnable_paths())
@pytest.mark.parametrize("g", GRID, ids=lambda g: f"d{g[0]}-h{g[1]}{'' if g[2] else '-nobias'}")
def test_fa3_attention_equals_numpy(grid_library, monkeypatch, path, g):
    head_dim, heads, with_bias = g
    rng = np.random.default_rng(head_dim * 10 + heads)
    # scales from a max|x| of ~3 per head: a standard normal input saturates now and then
    scales = [(rng.random(heads) * 0.01 + 0.02).astype(np.float32) for _ in range(3)]
    softmax_scale = float(1 / np.sqrt(head_dim))
    sess = session(one_node_model(int8_spec(*g), scales, softmax_scale, with_bias), grid_library, path, monkeypatch)
    for call in CALLS:
        feeds = _feeds(rng, heads, heads * head_dim, call, with_bias)
        (got,) = sess.run(None, feeds)
        want = reference(feeds["q"], feeds["k"], feeds["v"], *scales, feeds.get("bias"), softmax_scale, heads)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=f"{path} {call}")


@pytest.mark.parametrize("path", runnable_paths())
def test_one_scale_for_every_head(grid_library, monkeypatch, path):
    rng = np.random.default_rng(7)
    scales = [np.array([s], np.float32) for s in (0.02, 0.03, 0.025)]
    sess = session(one_node_model(int8_spec(16, 4, True, "per_tensor"), scales, 0.25, True), grid_library, path,
                   monkeypatch)
    feeds = _feeds(rng, 4, 64, (2, 9, 11, "batch"), True)
    want = reference(feeds["q"], feeds["k"], feeds["v"], *scales, feeds["bias"], 0.25, 4)
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("path", runnable_paths())
def test_values_on_and_next_to_rounding_ties_quantize_as_quantizelinear(grid_library, monkeypatch, path):
    """The vector paths multiply by 1/scale and divide only near a half-integer: inputs at
    (n + 0.5)·s and one float either side of it must round as QuantizeLinear's division does."""
    rng = np.random.default_rng(11)
    scales = [np.array([0.0213, 0.0371, 0.0119, 0.0557], np.float32) for _ in range(3)]
    sess = session(one_node_model(int8_spec(16, 4, True), scales, 0.25, True), grid_library, path, monkeypatch)
    feeds = _feeds(rng, 4, 64, (2, 9, 11, "batch"), True)
    per = np.repeat(scales[0], 16)
    for name in ("q", "k", "v"):
        halves = (rng.integers(-120, 120, feeds[name].shape) + 0.5).astype(np.float32) * per
        nudge = rng.integers(-1, 2, feeds[name].shape)             # on the tie, one float below or above
        feeds[name] = np.where(nudge < 0, np.nextafter(halves, -np.inf),
                               np.where(nudge > 0, np.nextafter(halves, np.inf), halves)).astype(np.float32)
    want = reference(feeds["q"], feeds["k"], feeds["v"], *scales, feeds["bias"], 0.25, 4)
    np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_shapes_the_spec_does_not_have_are_refused(grid_library, monkeypatch):
    rng = np.random.default_rng(0)
    scales = [np.full(4, 0.02, np.float32)] * 3
    sess = session(one_node_model(int8_spec(16, 4, True), scales, 0.25, True), grid_library, "scalar", monkeypatch)
    feeds = _feeds(rng, 4, 64, (1, 3, 5, "batch"), True)
    feeds["v"] = feeds["v"][:, :4]
    with pytest.raises(Exception, match=r"value has shape \[1, 4, 64\], not \[1, 5, 64\]"):
        sess.run(None, feeds)
    with pytest.raises(Exception, match="the scales hold 3 values, not 1 or 4"):
        session(one_node_model(int8_spec(16, 4, True), [np.full(3, 0.02, np.float32)] * 3, 0.25, True), grid_library,
                "scalar", monkeypatch)


# -- the lowering, end to end on the seeded BERT block -------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from models import bert_block
    return bert_block.write(tmp_path_factory.mktemp("bert"))


def _compile(bert, out, settings=()):
    return compile_model(bert["model"], target="cpu", recipe="w8a8-fa3", calib=bert["calib"],
                         verify_data=bert["eval"], output_dir=out, progress=False, verify_samples=16,
                         settings=ONLY_THIS_OP + tuple(settings))


def test_w8a8_fa3_runs_its_attention_in_the_generated_kernel(bert, tmp_path):
    result = _compile(bert, tmp_path / "kernels")
    standard = _compile(bert, tmp_path / "standard", ("generate_kernels.enabled=false",))
    out = tmp_path / "kernels"
    model = onnx.load(out / "model.onnx")
    generated = [n for n in model.graph.node if n.op_type == "QAttentionInt8"]
    assert len(generated) == 2 and not any(n.op_type == "MultiHeadAttention" for n in model.graph.node)
    # the Q/K/V quantization moved into the kernel: no Q/DQ pair is left on the head views
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "_heads" in n.input[0]
                   for n in model.graph.node)
    assert result.report["generated_kernels"]["ops"]["QAttentionInt8"] == sorted(n.name for n in generated)
    for node in generated:
        record = result.report["layers"][node.name]
        assert record["kernel"] == "QAttentionInt8" and not any("not FA3 speed" in n for n in record.get("notes", []))
    feeds = {k: v[:1] for k, v in np.load(bert["eval"]).items()}   # compiled at batch 1
    got = run_compiled(out / "model.onnx", feeds, out / "kernels" / LIBRARY)
    want = run_compiled(tmp_path / "standard" / "model.onnx", feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert result.worst_output("sqnr_db") == pytest.approx(standard.worst_output("sqnr_db"), abs=0.05)
