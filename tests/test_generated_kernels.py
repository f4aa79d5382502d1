"""Generated CPU kernels (backends/cpu/generated_kernels.py, backends/cpu/kernels/*.j2).

Each kernel is checked against an independent numpy reference, exactly (the integer
accumulators are exact and the float epilogue keeps the standard-op form's order), on every
ISA path this machine can run, with tails (dims that are no multiple of the vector width),
per-tensor weight scales, zero rows and round-half-to-even ties — and on a real layer's
inputs. The compiled model is checked against the standard-op form in onnxruntime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernel_harness import ONLY_THIS_OP, run_compiled, runnable_paths, session
from qcompile.backends.cpu.generated_kernels import TEMPLATES
from qcompile.backends.cpu.per_token_matmul import qmatmul_spec
from qcompile.driver import compile_model
from qcompile.errors import EXIT_TARGET
from qcompile.kernelgen.build import LIBRARY, build
from qcompile.kernelgen.ort_headers import find_headers
from qcompile.kernelgen.render import render_sources

GRID = [(1, 1), (3, 5), (37, 70), (64, 64), (130, 17), (384, 96), (16, 257)]


def reference(x: np.ndarray, w: np.ndarray, ws: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token symmetric int8 x, int8 W, exact int32 products, then ((acc * s) * ws) + b in fp32."""
    s = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(127), np.float32(1e-12)).astype(np.float32)
    q = np.clip(np.round(x / s), -127, 127).astype(np.int64)          # np.round: half to even, as ONNX Round
    acc = (q @ w.astype(np.int64)).astype(np.int32)
    return ((acc.astype(np.float32) * s) * ws.astype(np.float32)) + b


def gelu_reference(pre: np.ndarray) -> np.ndarray:
    """GELU's erf form in float64 (com.microsoft Gelu), on the kernel's exact pre-activation."""
    pre = pre.astype(np.float64)
    return 0.5 * pre * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(pre / math.sqrt(2.0)))


def assert_gelu_close(got: np.ndarray, pre: np.ndarray, what: str) -> None:
    """Within the vector erf's error (Abramowitz & Stegun 7.1.26: 1.5e-7) and fp32 rounding."""
    np.testing.assert_allclose(got, gelu_reference(pre), rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(pre).max(initial=0))),
                               err_msg=what)


def one_node_model(w, ws, b, spec_id: str, k: int) -> bytes:
    node = helper.make_node("QMatMulPerToken", ["x", "w", "ws", "b"], ["y"], domain="com.qcompile", spec=spec_id)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
                               numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("com.qcompile", 1)]
                             ).SerializeToString()


def spec_for(k: int, n: int, gelu: bool = False):
    return qmatmul_spec(ir.Value(const_value=ir.tensor(np.zeros((k, n), np.int8))), "avx512_vnni", gelu=gelu)


GELU_GRID = [(3, 5), (37, 70), (64, 256)]


@pytest.fixture(scope="module")
def grid_library() -> Path:
    """Every grid spec rendered and compiled into one library (all three ISA paths in each)."""
    specs = [spec_for(k, n) for k, n in GRID] + [spec_for(k, n, gelu=True) for k, n in GELU_GRID]
    return build(render_sources(TEMPLATES, specs, "test"), find_headers()).path


@pytest.mark.parametrize("path", runnable_paths())
@pytest.mark.parametrize("k,n", GRID)
def test_qmatmul_per_token_equals_numpy(grid_library, monkeypatch, path, k, n):
    rng = np.random.default_rng(k * 1000 + n)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    sess = session(one_node_model(w, ws, b, spec_for(k, n).id, k), grid_library, path, monkeypatch)
    for shape in [(1, k), (5, k), (13, k), (2, 7, k), (0, k)]:
        x = (rng.standard_normal(shape) * rng.choice([0.01, 1, 300], size=shape[:-1] + (1,))).astype(np.float32)
        (got,) = sess.run(None, {"x": x})
        np.testing.assert_array_equal(got, reference(x, w, ws, b), err_msg=f"{path} {shape}")
        assert got.shape == shape[:-1] + (n,)


@pytest.mark.parametrize("path", runnable_paths())
@pytest.mark.parametrize("k,n", GELU_GRID)
def test_the_gelu_epilogue_equals_numpy(grid_library, monkeypatch, path, k, n):
    """GELU on the exact pre-activation: the integer part stays exact, the erf is within 1e-6."""
    rng = np.random.default_rng(k + n)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = (rng.random(n) * 0.02 / np.sqrt(k) + 1e-4).astype(np.float32)   # pre-activations around ±3
    b = rng.standard_normal(n).astype(np.float32)
    sess = session(one_node_model(w, ws, b, spec_for(k, n, gelu=True).id, k), grid_library, path, monkeypatch)
    for shape in [(1, k), (9, k), (2, 7, k), (0, k)]:
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        (got,) = sess.run(None, {"x": x})
        assert_gelu_close(got, reference(x, w, ws, b), f"{path} {shape}")
    x = np.zeros((1, k), np.float32)                     # GELU(bias) alone, with large |bias|
    big = np.linspace(-12, 12, n).astype(np.float32)
    sess = session(one_node_model(w, ws, big, spec_for(k, n, gelu=True).id, k), grid_library, path, monkeypatch)
    assert_gelu_close(sess.run(None, {"x": x})[0], reference(x, w, ws, big), f"{path} large")


@pytest.mark.parametrize("path", runnable_paths())
def test_ties_zero_rows_and_a_per_tensor_weight_scale(grid_library, monkeypatch, path):
    k, n = 37, 70
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = np.array([0.01], np.float32)                    # one scale for every channel
    b = np.zeros(n, np.float32)
    sess = session(one_node_model(w, ws, b, spec_for(k, n).id, k), grid_library, path, monkeypatch)
    ties = np.tile(np.array([127, 2.5, -3.5, 0.5, -0.5, 1.5], np.float32), 7)[:k]   # scale 1: x/s lands on .5
    x = np.stack([ties, np.zeros(k, np.float32), -ties])
    (got,) = sess.run(None, {"x": x})
    np.testing.assert_array_equal(got, reference(x, w, ws, b))
    assert not got[1].any()


def test_a_spec_the_library_lacks_is_refused(grid_library, monkeypatch):
    w = np.zeros((5, 3), np.int8)
    model = one_node_model(w, np.ones(3, np.float32), np.zeros(3, np.float32), "000000000000", 5)
    with pytest.raises(Exception, match="spec 000000000000 is not in this kernel library"):
        session(model, grid_library, "scalar", monkeypatch)


# -- the lowering, end to end on the seeded BERT block ------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict[str, Path]:
    from models import bert_block
    return bert_block.write(tmp_path_factory.mktemp("bert"))


def _compile(bert, out: Path, settings=(), **kw):
    return compile_model(bert["model"], target="cpu", recipe="w8a8-dynamic", calib=bert["calib"],
                         verify_data=bert["eval"], output_dir=out, progress=False, verify_samples=16,
                         settings=ONLY_THIS_OP + tuple(settings), **kw)


def test_w8a8_dynamic_lowers_to_generated_kernels(bert, tmp_path):
    result = _compile(bert, tmp_path / "kernels")
    standard = _compile(bert, tmp_path / "standard", settings=("generate_kernels.enabled=false",))
    out = tmp_path / "kernels"
    model = onnx.load(out / "model.onnx")
    generated = [n for n in model.graph.node if n.domain == "com.qcompile"]
    quantized = [name for name, r in result.report["layers"].items() if r["status"] == "quantized"]
    assert len(generated) == len(quantized) == 12 and {n.name for n in generated} == set(quantized)
    assert not any(n.op_type in ("MatMulInteger", "Round", "ReduceMax") for n in model.graph.node)
    # fuse's BiasGelu after the FFN input layer: its bias and its GELU are the kernel's epilogue
    ops = [n.op_type for n in model.graph.node]
    assert "BiasGelu" not in ops and "Gelu" not in ops
    manifest = json.loads((out / "kernels" / "manifest.json").read_text())
    gelu_layers = {name for k in manifest["kernels"] if k["spec"]["epilogue"] == "bias+gelu" for name in k["layers"]}
    ffn_in = [n for n in generated if n.name in gelu_layers]
    biases = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(ffn_in) == 2 and all("intermediate" in n.name for n in ffn_in)
    assert all(biases[n.input[3]].any() for n in ffn_in), "the BiasGelu bias went into the kernel"
    # verify compares each layer on a tensor that means the same in both graphs: the FFN input
    # layer after its GELU (which the kernel now computes)
    table = result.report["verification"]["layers"]
    assert set(table) == set(quantized)
    assert all(table[n.name]["tensor"].endswith("intermediate_act_fn/Mul_1_output_0") for n in ffn_in)
    assert all(f"{n.name}_output_0" not in n.output for n in ffn_in)
    assert {"domain": "com.qcompile", "version": 1} in [{"domain": o.domain, "version": o.version}
                                                        for o in model.opset_import]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcompile.kernels.library"] == f"kernels/{LIBRARY}"
    section = result.report["generated_kernels"]
    # one kernel per distinct (K, N, epilogue): 64x64 (Q, K, V, output), 64x256 + GELU (FFN in), 256x64 (FFN out)
    assert section["built"] and section["layers"] == 12 and section["kernels"] == 3
    assert all(result.report["layers"][name]["kernel"] == "QMatMulPerToken" for name in quantized)
    assert sorted(sum((k["layers"] for k in manifest["kernels"]), [])) == sorted(quantized)
    files = {p.name for p in (out / "kernels").iterdir()}
    assert {LIBRARY, "manifest.json", "CMakeLists.txt", "register.cpp", "qcompile_kernels.h"} <= files
    assert all(f"{k['spec']['op']}_{k['id']}.cpp" in files for k in manifest["kernels"])
    # the shipped kernels against the standard-op form, in onnxruntime, on held-out inputs
    feeds = dict(np.load(bert["eval"]))
    feeds = {k: v[:1] for k, v in feeds.items()}
    got = run_compiled(out / "model.onnx", feeds, out / "kernels" / LIBRARY)
    want = run_compiled(tmp_path / "standard" / "model.onnx", feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert result.worst_output("sqnr_db") == pytest.approx(standard.worst_output("sqnr_db"), abs=0.05)


def test_kernels_run_on_a_real_layers_inputs(bert, grid_library, monkeypatch, tmp_path):
    """The FFN input of layer 0, captured from the float model on real inputs, through the kernel."""
    model = onnx.load(bert["model"])
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and "intermediate" in n.name]
    x_name, w_name = matmuls[0].input
    model.graph.output.append(helper.make_tensor_value_info(x_name, TensorProto.FLOAT, None))
    feeds = {k: v[:4] for k, v in np.load(bert["eval"]).items()}
    x = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run([x_name], feeds)[0]
    wf = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == w_name)
    ws = (np.abs(wf).max(0) / 127).astype(np.float32)
    w = np.clip(np.round(wf / ws), -127, 127).astype(np.int8)
    k, n = w.shape
    spec, gelu = spec_for(k, n), spec_for(k, n, gelu=True)     # the FFN input layer: GELU follows it
    library = build(render_sources(TEMPLATES, [spec, gelu], "test"), find_headers()).path
    b = np.zeros(n, np.float32)
    for path in runnable_paths():
        sess = session(one_node_model(w, ws, b, spec.id, k), library, path, monkeypatch)
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], reference(x, w, ws, b), err_msg=path)
        sess = session(one_node_model(w, ws, b, gelu.id, k), library, path, monkeypatch)
        assert_gelu_close(sess.run(None, {"x": x})[0], reference(x, w, ws, b), path)


def test_verify_cli_loads_the_kernels_beside_the_model(bert, tmp_path, run_cli):
    _compile(bert, tmp_path / "out")
    done = run_cli(["verify", bert["model"], tmp_path / "out" / "model.onnx", "--data", bert["eval"],
                    "--samples", "4"])
    assert done.code == 0, done.err
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "out" / "model.onnx").rename(moved / "model.onnx")
    done = run_cli(["verify", bert["model"], moved / "model.onnx", "--data", bert["eval"]])
    assert done.code == EXIT_TARGET and "kernels/libqcompile_kernels.so, which is not beside it" in done.err


def test_no_compiler_falls_back_to_standard_ops_with_one_warning(bert, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "empty-cache"))   # no library built before
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(find_headers().include_dir))
    result = _compile(bert, tmp_path / "out")
    model = onnx.load(tmp_path / "out" / "model.onnx")
    assert not any(n.domain == "com.qcompile" for n in model.graph.node)
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 12
    assert not (tmp_path / "out" / "kernels").exists()
    warnings = [w for w in result.report["warnings"] if "generated kernels not built" in w]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0]
    assert result.report["generated_kernels"] == {"built": False, "reason": warnings[0].split(": ", 1)[1],
                                                  "layers": 12}


def test_a_bad_ort_include_dir_is_one_clear_error(bert, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    done = run_cli([bert["model"], "--recipe", "w8a8-dynamic", "--calib", bert["calib"], "-o", tmp_path / "out"])
    assert done.code == EXIT_TARGET and "holds no onnxruntime C API headers" in done.err
    assert "Traceback" not in done.err and not (tmp_path / "out").exists()


def test_a_layer_fed_by_another_generated_layer(tmp_path):
    """MatMul -> MatMul with nothing between: the second layer's input is the first one's output,
    which the first rewrite replaces; the second is matched after it, on the graph as it is then."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "chain.onnx")
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    kw = dict(target="cpu", recipe="w8a8-dynamic", verify_data=tmp_path / "data.npz", progress=False)
    result = compile_model(tmp_path / "chain.onnx", output_dir=tmp_path / "kernels", **kw)
    compile_model(tmp_path / "chain.onnx", output_dir=tmp_path / "standard",
                  settings=("generate_kernels.enabled=false",), **kw)
    assert result.report["generated_kernels"]["layers"] == 2
    feeds = {"x": np.load(tmp_path / "data.npz")["x"][:1]}
    got = run_compiled(tmp_path / "kernels" / "model.onnx", feeds, tmp_path / "kernels" / "kernels" / LIBRARY)
    want = run_compiled(tmp_path / "standard" / "model.onnx", feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
