"""Models as users bring them, beyond the clean fp32 export: ops onnxruntime does not know
(a custom domain, with and without its custom-op library), a dynamic model compiled without
data, an IR version newer than onnxruntime reads, an empty file, and Ascend outputs handed
back to `verify` or to the compiler."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import EXIT_MODEL, EXIT_USAGE


def _save(model: onnx.ModelProto, path, ir_version: int = 8):
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path


def _custom_op_model(tmp_path):
    """x [64, 64] -> ai.onnx.contrib::Inverse (onnxruntime-extensions) -> MatMul W [64, 256]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Inverse", ["x"], ["inv"], domain="ai.onnx.contrib", name="inverse"),
         helper.make_node("MatMul", ["inv", "W"], ["y"], name="mm")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)])
    # well-conditioned matrices, 4 of them stacked along axis 0 (the model's fixed "batch" of 64 rows)
    x = np.concatenate([rng.standard_normal((64, 64)) + 8 * np.eye(64) for _ in range(4)]).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return _save(model, tmp_path / "custom.onnx"), tmp_path / "calib.npz"


def test_a_custom_domain_op_is_named_before_any_work(run_cli, tmp_path):
    model, calib = _custom_op_model(tmp_path)
    res = run_cli([model, "--calib", calib, "-o", tmp_path / "out", "-q"])
    flat = " ".join(res.err.split())
    assert res.code == EXIT_MODEL, res.err
    assert "ai.onnx.contrib::Inverse" in flat and "'inverse'" in flat and "--custom-ops" in flat, flat
    assert "Traceback" not in res.err and not (tmp_path / "out").exists()


def test_custom_ops_library_runs_in_every_session_of_the_compile_and_of_verify(run_cli, tmp_path):
    ortx = pytest.importorskip("onnxruntime_extensions")  # in the test extra: installed in CI
    model, calib = _custom_op_model(tmp_path)
    out = tmp_path / "out"
    res = run_cli([model, "--calib", calib, "-o", out, "-q", "--custom-ops", ortx.get_library_path()])
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["layers"]["mm"]["status"] == "quantized"           # calibrated through the custom op
    assert [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node].count("Inverse") == 1
    compiled_sqnr = report["verification"]["outputs"]["y"]["sqnr_db"]
    assert 20 < compiled_sqnr < 80                                   # verified: int8 noise, not a copy
    res = run_cli(["verify", model, out / "model.onnx", "--data", calib, "--custom-ops", ortx.get_library_path(),
                   "--json", tmp_path / "v.json"])
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "v.json").read_text())["outputs"]["y"]["sqnr_db"] == compiled_sqnr


def test_a_custom_ops_file_that_is_not_a_library_is_a_usage_error(run_cli, tmp_path):
    model, calib = _custom_op_model(tmp_path)
    fake = tmp_path / "libfake.so"
    fake.write_text("not a library")
    res = run_cli([model, "--calib", calib, "-o", tmp_path / "out", "-q", "--custom-ops", fake])
    assert res.code == EXIT_USAGE and "libfake.so" in res.err and "Traceback" not in res.err, res.err
    res = run_cli([model, "--calib", calib, "-o", tmp_path / "out", "-q", "--custom-ops", tmp_path / "missing.so"])
    assert res.code == EXIT_USAGE and "no such file" in res.err, res.err


def _dynamic_conv(tmp_path, ir_version=8):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                               helper.make_node("Relu", ["c"], ["y"])], "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _save(model, tmp_path / f"dyn_ir{ir_version}.onnx", ir_version)


def test_data_free_compile_of_a_dynamic_model_verifies_at_the_pinned_shape(run_cli, tmp_path):
    out = tmp_path / "out"
    res = run_cli([_dynamic_conv(tmp_path), "--input-shape", "x:1,3,48,96", "-o", out, "-q"])
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["samples"] == 4 and "synthetic" in report["verification"]["data"]
    dims = [d.dim_value for d in onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 48, 96]


def test_a_model_with_a_newer_ir_version_than_onnxruntime_reads_compiles_and_verifies(run_cli, tmp_path):
    model = _dynamic_conv(tmp_path, ir_version=onnx.IR_VERSION if onnx.IR_VERSION > 13 else 14)
    out = tmp_path / "out"
    res = run_cli([model, "--input-shape", "x:1,3,64,64", "-o", out, "-q"])
    assert res.code == 0, res.err
    assert onnx.load(str(out / "model.onnx")).ir_version <= 13
    assert json.loads((out / "report.json").read_text())["verification"]["outputs"]["y"]["sqnr_db"] > 20


def test_an_empty_file_is_called_empty(run_cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    res = run_cli([tmp_path / "empty.onnx", "-o", tmp_path / "out", "-q"])
    assert res.code == EXIT_MODEL and "empty file (0 bytes)" in " ".join(res.err.split()), res.err


@pytest.fixture
def ascend_out(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "ascend"
    res = run_cli([small_cnn_files["model"], "--target", "ascend310b", "--calib", small_cnn_files["calib"],
                   "--verify-data", small_cnn_files["eval"], "-o", out, "-q"])
    assert res.code == 0, res.err
    return out


def test_verify_on_an_ascend_output_checks_its_reference_lowering_as_the_compile_did(
        run_cli, small_cnn_files, ascend_out, tmp_path):
    report = json.loads((ascend_out / "report.json").read_text())
    res = run_cli(["verify", small_cnn_files["model"], ascend_out / "model.onnx", "--data", small_cnn_files["eval"],
                   "--json", tmp_path / "v.json"])
    assert res.code == 0, res.err
    assert "reference lowering of the Ascend graph" in " ".join(res.out.split())
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["outputs"] == report["verification"]["outputs"]       # the very numbers the compile reported
    res = run_cli(["verify", small_cnn_files["model"], ascend_out / "model.qdq.onnx", "--data",
                   small_cnn_files["eval"]])
    assert res.code == 0 and "checked: model.qdq.onnx" in " ".join(res.out.split()), res.err


def test_an_ascend_deploy_graph_fed_back_to_the_compiler_is_refused(run_cli, small_cnn_files, ascend_out, tmp_path):
    res = run_cli([ascend_out / "model.onnx", "--target", "ascend310b", "--calib", small_cnn_files["calib"],
                   "-o", tmp_path / "again", "-q"])
    flat = " ".join(res.err.split())
    assert res.code == EXIT_MODEL and "Ascend deploy graph" in flat and "model.qdq.onnx" in flat, flat
    assert not (tmp_path / "again").exists()


def test_onnxruntimes_own_ops_are_known_whatever_their_domain():
    """onnxruntime registers contrib ops in the ONNX domain too (SimplifiedLayerNormalization,
    what `fuse` writes for RMSNorm): a fused decoder must not be refused (a verify of SmolLM2 was)."""
    import onnx_ir as ir

    from qcompile.op_support import unknown_ops
    graph = helper.make_graph(
        [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["n"], name="rms", axis=-1),
         helper.make_node("MatMulNBits", ["n", "b", "s"], ["y"], name="mm", domain="com.microsoft", K=8, N=8,
                          bits=4, block_size=16),
         helper.make_node("NotAnOp", ["y"], ["z"], name="bad", domain="com.example")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid("com.example", 1)])
    assert unknown_ops(ir.from_proto(model)) == {"com.example::NotAnOp": ["bad"]}
