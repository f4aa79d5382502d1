"""The `cuda` target (backends/cuda/): an explicit-quantization Q/DQ graph placed by TensorRT's
rules, walked node by node (backends/cuda/placement.py re-derives each rule from the graph), its
numbers verified in onnxruntime against the original; the architecture check; what TensorRT's
parser would not take. No GPU is involved: nothing here builds an engine."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TinyModels
from qcompile.backends.cuda.placement import placement
from qcompile.driver import compile_model
from qcompile.errors import EXIT_TARGET
from qcompile.targets import load_target
from test_schemes import run


def residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv+ReLU (a) -> Conv+ReLU -> Conv -> Add(., a) -> ReLU -> Conv s2 -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, *shape):
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), name))
        return name

    def b(name, n):
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.05).astype(np.float32), name))
        return name

    def conv(x, wn, bn, out, name, **kw):
        return helper.make_node("Conv", [x, wn, bn], [out], name=name, pads=[1, 1, 1, 1], **kw)

    nodes = [conv("x", w("w0", 8, 3, 3, 3), b("b0", 8), "c0", "/stem/Conv"),
             helper.make_node("Relu", ["c0"], ["a"], name="/stem/Relu"),
             conv("a", w("w1", 8, 8, 3, 3), b("b1", 8), "c1", "/block/conv1/Conv"),
             helper.make_node("Relu", ["c1"], ["r1"], name="/block/Relu"),
             conv("r1", w("w2", 8, 8, 3, 3), b("b2", 8), "c2", "/block/conv2/Conv"),
             helper.make_node("Add", ["c2", "a"], ["s"], name="/block/Add"),
             helper.make_node("Relu", ["s"], ["r2"], name="/block/Relu_1"),
             conv("r2", w("w3", 16, 8, 3, 3), b("b3", 16), "c3", "/down/Conv", strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="/head/GAP"),
             helper.make_node("Flatten", ["g"], ["f"], name="/head/Flatten"),
             helper.make_node("Gemm", ["f", w("wf", 10, 16), b("bf", 10)], ["y"], name="/head/fc/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "residual_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# the generated CUDA kernels are tests/test_cuda_kernels.py's; here only TensorRT's graph
NO_KERNELS = ("cuda_kernels.enabled=false",)


def _compile(tmp_path, model, target="cuda", recipe="w8a8", name="m"):
    path, npz = TinyModels.save(model, tmp_path / f"in-{name}", "model", TinyModels.data((3, 16, 16), 32))
    out = tmp_path / f"out-{name}"
    result = compile_model(path, target=target, recipe=recipe, calib=npz, output_dir=out, progress=False,
                           verify_samples=8, settings=NO_KERNELS if target == "cuda" else ())
    return onnx.load(out / "model.onnx"), result.report, out


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def test_a_residual_cnn_follows_tensorrts_placement_rules(tmp_path):
    model, report, out = _compile(tmp_path, residual_cnn())
    found = placement(ir.serde.deserialize_model(model).graph)
    assert sorted(found.layers) == sorted(["/stem/Conv", "/block/conv1/Conv", "/block/conv2/Conv", "/down/Conv",
                                           "/head/fc/Gemm"])
    assert found.float_inputs == [] and found.outputs_unexpected == [] and found.foreign_ops == []
    assert found.weights_per_channel == 5
    assert len(found.residual_skips_quantized) == 1 and found.residual_skips_float == []
    # the same rules, read off the ONNX graph directly
    add = next(n for n in model.graph.node if n.op_type == "Add")
    branch, skip = (_producer(model, t) for t in add.input)
    assert branch.op_type == "Conv" and branch.name == "/block/conv2/Conv", "the Conv output reaches the Add unquantized"
    assert skip.op_type == "DequantizeLinear", "the skip input is quantized"
    for node in model.graph.node:
        if node.op_type == "Conv":
            assert _producer(model, node.input[0]).op_type == "DequantizeLinear"
            weight_dq = _producer(model, node.input[1])
            assert weight_dq.op_type == "DequantizeLinear"
            q = next(t for t in model.graph.initializer if t.name == weight_dq.input[0])
            assert q.data_type == TensorProto.INT8
            assert not any(u.op_type == "QuantizeLinear" and u.input[0] == node.output[0] for u in model.graph.node), \
                f"{node.name}: no Q/DQ on a layer output"
    # TensorRT's int8 is symmetric: every zero point is an int8 0
    zps = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert report["cuda"]["architecture"] == "sm90" and report["cuda"]["placement"]["residual_skips_quantized"] == 1
    assert report["quantize"]["residual_skip_inputs"] == 1
    assert report["verification"]["outputs"]["y"]["sqnr_db"] > 20
    script = out / "trtexec.sh"
    assert script.is_file() and os.access(script, os.X_OK) and "--onnx=model.onnx" in script.read_text()


def test_the_cpu_target_keeps_its_own_placement(tmp_path):
    """The placement settings are the cuda descriptor's: cpu still quantizes Conv outputs (its
    QLinearConv needs them) and adds no residual skip Q/DQ."""
    _, report, _ = _compile(tmp_path, residual_cnn(), target="cpu:avx512_vnni")
    assert report["quantize"]["residual_skip_inputs"] == 0


def test_bert_block_for_cuda_has_no_onnxruntime_only_ops(tmp_path):
    from models import bert_block
    files = bert_block.write(tmp_path / "bert")
    out = tmp_path / "out"
    result = compile_model(files["model"], target="cuda", recipe="w8a8-smooth", calib=files["calib"],
                           verify_data=files["eval"], output_dir=out, progress=False, verify_samples=8,
                           settings=NO_KERNELS)
    model = onnx.load(out / "model.onnx")
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    found = placement(ir.serde.deserialize_model(model).graph)
    # the 12 linears; the attention products (Q·Kᵀ, P·V) stay float on this target (cuda.yaml says why)
    assert len(found.layers) == 12 and found.float_inputs == [] and found.outputs_unexpected == []
    products = [n for n, r in result.report["layers"].items() if "attention/self/MatMul" in n]
    assert len(products) == 4 and all(result.report["layers"][n]["status"] == "float" for n in products)
    assert all("quantize_activation_products" in result.report["layers"][n]["reason"] for n in products)
    # 23.9 dB on these 8 samples (25.2 on 16) against 25.5 on cpu (docs/cuda.md)
    assert result.report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"] > 22


def test_fp8_needs_sm89_or_later(tmp_path, run_cli):
    path, npz = TinyModels.save(residual_cnn(), tmp_path / "in", "model", TinyModels.data((3, 16, 16), 8))
    done = run_cli([path, "--target", "cuda:sm80", "--recipe", "fp8", "--calib", npz, "-o", tmp_path / "o80"])
    assert done.code == EXIT_TARGET
    assert "FP8" in done.err and "sm89" in done.err and "cuda:sm80" in done.err
    assert not (tmp_path / "o80").exists()
    done = run_cli([path, "--target", "cuda:sm89", "--recipe", "fp8", "--calib", npz, "-o", tmp_path / "o89"])
    assert done.code == 0, done.err
    model = onnx.load(tmp_path / "o89" / "model.onnx")
    fp8 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN}
    assert fp8 and any(n.op_type == "QuantizeLinear" and n.input[2] in fp8 for n in model.graph.node), \
        "model.onnx keeps its FP8 Q/DQ for TensorRT"
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    report = json.loads((tmp_path / "o89" / "report.json").read_text())
    assert report["cuda"]["verified"].startswith("a reference lowering")   # onnxruntime has no FP8 kernels
    assert report["verification"]["outputs"]["y"]["sqnr_db"] > 15


def test_an_operator_tensorrt_cannot_parse_is_refused(tmp_path, run_cli):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/fc/MatMul"),
             helper.make_node("Gelu", ["h"], ["y"], domain="com.microsoft", name="/act/Gelu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                              [numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    path, npz = TinyModels.save(model, tmp_path / "in", "model", TinyModels.data((64,), 8))
    done = run_cli([path, "--target", "cuda", "--recipe", "w8a8", "--calib", npz, "-o", tmp_path / "out"])
    assert done.code == EXIT_TARGET and "com.microsoft::Gelu" in done.err and "TensorRT" in done.err
    assert not (tmp_path / "out").exists()


def test_the_default_architecture_is_sm90():
    assert load_target("cuda").variant == "sm90"
    assert load_target("cuda:sm80").setting("fp8") is False
    with pytest.raises(Exception, match="no variant"):
        load_target("cuda:sm70")


def one_layer(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(W) -> y."""
    w = (np.random.default_rng(seed).standard_normal((32, 16)) * 0.3).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")], "one_layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_one_sided_input_is_quantized_as_with_a_zero_point(tmp_path):
    """A MatMul reading a one-sided tensor (ReLU-like data, here the graph input): on cuda it gets
    Add(x, z·s) -> symmetric Q/DQ and -z·s·colsum(W) after the MatMul, which computes what int8
    with a zero point computes — the same model compiled with asymmetric int8 activations
    (which TensorRT would not take) is the reference — and beats plain symmetric int8."""
    relu = lambda a: np.maximum(a, 0).astype(np.float32)  # noqa: E731
    path, npz = TinyModels.save(one_layer(), tmp_path / "in", "model", relu(TinyModels.data((32,), 64)))
    outs = {}
    for name, settings in (("shifted", ()), ("asymmetric", ("quantize.activation.symmetric=false",)),
                           ("plain", ("quantize.shift_one_sided=false",))):
        out = tmp_path / name
        result = compile_model(path, target="cuda", recipe="w8a8", calib=npz, output_dir=out, progress=False,
                               verify_samples=16, settings=settings + NO_KERNELS)
        outs[name] = (onnx.load(out / "model.onnx"), result.report)
    model, report = outs["shifted"]
    assert report["quantize"]["shifted_one_sided_activations"] == ["x"]
    assert outs["plain"][1]["quantize"]["shifted_one_sided_activations"] == []
    add = next(n for n in model.graph.node if n.op_type == "Add" and n.input[0] == "x")
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == add.output[0])
    zp = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == q.input[2])
    assert zp.dtype == np.int8 and not zp.any(), "still symmetric int8 for TensorRT"
    fc = next(n for n in model.graph.node if n.name == "/fc/MatMul")
    fix = next(n for n in model.graph.node if n.input and n.input[0] == fc.output[0])
    assert fix.op_type == "Add" and fix.output[0] == "y", "the layer's output keeps its name and value"
    x = relu(TinyModels.data((32,), 16, seed=5))
    runs = {k: run(m, {"x": x})[0] for k, (m, _) in outs.items()}     # one sample at a time (batch pinned)
    np.testing.assert_allclose(runs["shifted"], runs["asymmetric"], rtol=1e-5, atol=1e-5 * np.abs(runs["asymmetric"]).max())
    sqnr = {k: r["verification"]["outputs"]["y"]["sqnr_db"] for k, (_, r) in outs.items()}
    assert sqnr["shifted"] > sqnr["plain"] + 3, sqnr
