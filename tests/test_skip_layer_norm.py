"""The generated SkipLayerNorm (backends/cpu/skip_layer_norm.py, kernels/SkipLayerNorm.*.j2):
residual add + LayerNorm or RMSNorm, against a float64 numpy reference and against the
onnxruntime contrib op it replaces, on every ISA path this machine runs, with tails (H no
multiple of the vector width), a skip broadcast over the batch and the optional sum output;
then lowered in compiled models, where it only goes when the compile ships a library anyway."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernel_harness import runnable_paths, session
from qcompile.backends.cpu.generated_kernels import TEMPLATES
from qcompile.backends.cpu.skip_layer_norm import OP
from qcompile.driver import compile_model
from qcompile.kernelgen import KernelSpec
from qcompile.kernelgen.build import build
from qcompile.kernelgen.ort_headers import find_headers
from qcompile.kernelgen.render import render_sources
from test_schemes import ops

GRID = [(h, norm) for h in (384, 37, 16, 7) for norm in ("layer_norm", "rms")]
EPS = 1e-6


def spec_for(hidden: int, norm: str) -> KernelSpec:
    return KernelSpec(op=OP, family="cpu", isa="avx512_vnni", dtypes=(("activation", "float32"),),
                      static_dims=(("H", hidden),), dynamic_dims=("rows",), epilogue=norm)


@pytest.fixture(scope="module")
def library() -> Path:
    return build(render_sources(TEMPLATES, [spec_for(h, n) for h, n in GRID], "test"), find_headers()).path


def reference(x, skip, gamma, beta, bias, norm):
    """float64: v = x + skip + bias; LayerNorm (variance about the mean) or RMSNorm of each row."""
    v = x.astype(np.float64) + skip.astype(np.float64) + bias
    if norm == "rms":
        out = v / np.sqrt((v * v).mean(-1, keepdims=True) + EPS) * gamma
    else:
        mean = v.mean(-1, keepdims=True)
        out = (v - mean) / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + EPS) * gamma + beta
    return out, v


def _model(node: onnx.NodeProto, constants: dict, outputs: list[str], opset: str) -> bytes:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                            for n in ("x", "skip")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid(opset, 1)]).SerializeToString()


def generated_model(constants, spec, with_sum: bool) -> bytes:
    outputs = ["y", "sum"] if with_sum else ["y"]
    node = helper.make_node(OP, ["x", "skip", "gamma", "beta", "bias"], outputs, domain="com.qcompile",
                            spec=spec.id, epsilon=EPS)
    return _model(node, constants, outputs, "com.qcompile")


def contrib_model(constants, norm: str) -> bytes:
    """onnxruntime's own op for the same computation (what `fuse` writes)."""
    if norm == "rms":
        node = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"],
                                ["y", "", "", "sum"], domain="com.microsoft", epsilon=EPS)
    else:
        node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                                ["y", "", "", "sum"], domain="com.microsoft", epsilon=EPS)
    return _model(node, constants, ["y", "sum"], "com.microsoft")


def _constants(rng, hidden, norm):
    beta = rng.standard_normal(hidden).astype(np.float32) if norm == "layer_norm" else np.zeros(hidden, np.float32)
    return {"gamma": (rng.random(hidden) + 0.5).astype(np.float32), "beta": beta,
            "bias": rng.standard_normal(hidden).astype(np.float32)}


@pytest.mark.parametrize("path", runnable_paths())
@pytest.mark.parametrize("hidden,norm", GRID)
def test_skip_layer_norm_equals_numpy_and_the_contrib_op(library, monkeypatch, path, hidden, norm):
    rng = np.random.default_rng(hidden)
    c = _constants(rng, hidden, norm)
    spec = spec_for(hidden, norm)
    with_sum = session(generated_model(c, spec, True), library, path, monkeypatch)
    plain = session(generated_model(c, spec, False), library, path, monkeypatch)
    contrib = ort.InferenceSession(contrib_model(c, norm), providers=["CPUExecutionProvider"])
    for shape, skip_shape in [((2, 5, hidden), (2, 5, hidden)), ((3, 40, hidden), (40, hidden)),
                              ((1, hidden), (1, hidden)), ((0, hidden), (0, hidden))]:
        offset = rng.choice([0.0, 30.0])                  # a large mean: the variance is taken about it
        x = (rng.standard_normal(shape) * 3 + offset).astype(np.float32)
        skip = rng.standard_normal(skip_shape).astype(np.float32)
        want, want_sum = reference(x, skip, c["gamma"], c["beta"], c["bias"], norm)
        y, total = with_sum.run(None, {"x": x, "skip": skip})
        (y_plain,) = plain.run(None, {"x": x, "skip": skip})
        scale = max(1.0, float(np.abs(want).max(initial=0)))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{path} {shape}")
        np.testing.assert_allclose(total, want_sum, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(want_sum).max(initial=0))))
        np.testing.assert_array_equal(y_plain, y)
        if shape[0]:
            theirs, theirs_sum = contrib.run(None, {"x": x, "skip": skip})
            np.testing.assert_allclose(y, theirs, rtol=1e-4, atol=1e-4 * scale)
            np.testing.assert_array_equal(total, theirs_sum)


def test_a_skip_of_another_width_is_refused(library, monkeypatch):
    rng = np.random.default_rng(0)
    c = _constants(rng, 16, "layer_norm")
    sess = session(generated_model(c, spec_for(16, "layer_norm"), False), library, "scalar", monkeypatch)
    x = np.ones((2, 3, 16), np.float32)
    with pytest.raises(Exception, match=r"SkipLayerNorm: skip has shape \[2, 3, 8\]"):
        sess.run(None, {"x": x, "skip": np.ones((2, 3, 8), np.float32)})
    with pytest.raises(Exception, match=r"SkipLayerNorm: skip has shape \[4, 16\]"):
        sess.run(None, {"x": x, "skip": np.ones((4, 16), np.float32)})   # 6 rows: 4 does not divide them


# -- lowered in compiled models ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict[str, Path]:
    from models import bert_block
    return bert_block.write(tmp_path_factory.mktemp("bert"))


def _compile(files, out: Path, recipe: str, *settings):
    result = compile_model(files["model"], target="cpu", recipe=recipe, calib=files["calib"],
                           verify_data=files["eval"], output_dir=out, progress=False, verify_samples=8,
                           settings=settings)
    return onnx.load(out / "model.onnx"), result.report


def test_a_compile_with_quantized_kernels_takes_the_norms_along(bert, tmp_path):
    model, report = _compile(bert, tmp_path / "with", "w8a8-dynamic")
    without, without_report = _compile(bert, tmp_path / "without", "w8a8-dynamic", "generate_kernels.norms=never")
    norms = [n for n in model.graph.node if n.op_type == OP]
    assert len(norms) == 5 and "SkipLayerNormalization" not in ops(model)
    assert ops(without).count("SkipLayerNormalization") == 5 and OP not in ops(without)
    assert report["generated_kernels"]["ops"][OP] == sorted(n.name for n in norms)
    # the norms' own float rounding can flip a per-token int8 rounding downstream, so the two
    # graphs are not equal bit for bit; their accuracy is the same
    a = report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"]
    b = without_report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"]
    assert abs(a - b) < 0.3, (a, b)


def test_a_compile_without_quantized_kernels_stays_plain_onnxruntime_unless_asked(bert, tmp_path):
    plain, report = _compile(bert, tmp_path / "plain", "w8a8-smooth")
    assert "generated_kernels" not in report and not (tmp_path / "plain" / "kernels").exists()
    assert not any(n.domain == "com.qcompile" for n in plain.graph.node)
    asked, asked_report = _compile(bert, tmp_path / "asked", "w8a8-smooth", "generate_kernels.norms=always")
    assert ops(asked).count(OP) == 5 and asked_report["generated_kernels"]["built"]
    a = report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"]
    b = asked_report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"]
    assert abs(a - b) < 0.1


def test_the_llama_block_rmsnorms_lower_with_its_kv_cache_attention(tmp_path):
    from models import llama_block
    files = llama_block.write(tmp_path / "llama")
    model, report = _compile(files, tmp_path / "kv8", "w8a8-kv8")
    norms = [n for n in model.graph.node if n.op_type == OP]
    assert norms and "SkipSimplifiedLayerNormalization" not in ops(model)
    manifest = json.loads((tmp_path / "kv8" / "kernels" / "manifest.json").read_text())
    specs = {k["spec"]["epilogue"] for k in manifest["kernels"] if k["spec"]["op"] == OP}
    assert specs == {"rms"}
    assert report["verification"]["outputs"]["logits"]["sqnr_db"] > 15
