"""cpu lowering forms (backends/cpu/forms.py) against the QDQ graph they replace: static int8
MatMuls without output Q/DQ as MatMulIntegerToFloat (onnxruntime otherwise loses the int8 kernel
behind its MatMul+Add -> Gemm rewrite)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import TinyModels
from qcompile.targets import load_target
from test_schemes import compile_tiny, ops, run


def _matmul_integer_error(wmax: int) -> int:
    """Largest |error| of onnxruntime's MatMulInteger (uint8 x, zero point 128, int8 weights in
    [-wmax, wmax]) on this host against exact integer arithmetic."""
    rng = np.random.default_rng(0)
    w = rng.integers(-wmax, wmax + 1, (256, 64)).astype(np.int8)
    x = rng.integers(0, 256, (8, 256)).astype(np.uint8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w", "zx"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [8, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [8, 64])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(128), "zx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return int(np.abs(y.astype(np.int64) - (x.astype(np.int64) - 128) @ w.astype(np.int64)).max())


def test_the_host_descriptor_says_whether_u8s8_matmul_saturates():
    """The cpu descriptor's claim for this host's ISA, measured: where it lists MatMul as
    saturating, 8-bit weights overflow and 7-bit ones are exact; where not, 8-bit ones are exact."""
    saturating = "MatMul" in (load_target("cpu").setting("u8s8_saturating_ops") or ())
    assert _matmul_integer_error(63) == 0
    assert (_matmul_integer_error(127) > 0) == saturating


def test_static_matmul_lowers_to_matmulintegertofloat_with_qdq_numbers(tmp_path):
    model = TinyModels(0).mlp(1024, 1024, 8)  # fc1 is big enough for cpu's int8 threshold
    x = TinyModels.data((1024,), 8)
    final, qdq, report = compile_tiny(tmp_path, model, "w8a8", x, target="cpu")  # the host's kernels run it
    assert "MatMulIntegerToFloat" in ops(final) and report["cpu_forms"]["integer_matmul"] == 1
    layer = report["layers"]["/fc1/MatMul"]
    assert layer["lowered_to"] == layer["kernel"] == "MatMulIntegerToFloat"
    assert not {"MatMulInteger", "Cast", "Add"} & set(ops(final))   # one op: rescale and bias Add inside
    (got,) = run(final, {"x": x})
    (via_qdq,) = run(qdq, {"x": x}, optimize=False)
    # integer accumulation vs float accumulation of the dequantized values: same up to rounding
    np.testing.assert_allclose(got, via_qdq, rtol=1e-4, atol=1e-4 * np.abs(via_qdq).max())


def test_output_quantized_matmul_keeps_its_qdq_form(tmp_path):
    model = TinyModels(0).mlp(1024, 1024, 8)
    x = TinyModels.data((1024,), 8)
    recipe = tmp_path / "all.yaml"
    recipe.write_text("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n    - type: calibrate\n"
                      "    - type: quantize\n      output_quantization: all\n")
    final, _, report = compile_tiny(tmp_path, model, str(recipe), x)
    assert "MatMulIntegerToFloat" not in ops(final) and report["cpu_forms"]["integer_matmul"] == 0
    assert report["layers"]["/fc1/MatMul"]["kernel"] == "QLinearMatMul"


def test_bert_block_static_layers_take_their_bias_adds_and_biasgelu_biases(tmp_path):
    """On the fused BERT block every static int8 linear is one MatMulIntegerToFloat: the bias Adds
    and the BiasGelu biases move into it (each BiasGelu becomes a Gelu), the numbers stay those
    of the QDQ form, and verify's per-layer table still compares every layer on a tensor that
    means the same in both graphs (the FFN input layer after its Gelu, not a MatMul output
    that now includes the bias)."""
    from models import bert_block
    from qcompile.driver import compile_model
    files = bert_block.write(tmp_path / "bert")

    def compile_(name, *settings):
        out = tmp_path / name
        result = compile_model(files["model"], target="cpu", recipe="w8a8-smooth", calib=files["calib"],
                               verify_data=files["eval"], output_dir=out, progress=False, verify_samples=8,
                               settings=settings)
        return onnx.load(out / "model.onnx"), result.report

    model, report = compile_("int")
    qdq_model, qdq_report = compile_("qdq", "cpu_lower.integer_matmul=false")
    names = ops(model)
    fused = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 12 and not {"MatMulInteger", "MatMul", "BiasGelu"} & set(names) and names.count("Gelu") == 2
    biased = [n for n in fused if len(n.input) == 7 and n.input[6]]
    assert len(biased) == 8          # Q, K, V (their Adds) and the FFN input (its BiasGelu), per layer
    table = report["verification"]["layers"]
    assert set(table) == {r for r, v in report["layers"].items() if v["status"] == "quantized"}
    tensors = {name for n in model.graph.node for name in n.output}
    for layer, entry in table.items():
        assert entry["tensor"] in tensors, layer
        if "intermediate" in layer:       # the FFN input layer: compared after its Gelu
            assert entry["tensor"].endswith("intermediate_act_fn/Mul_1_output_0")
            assert f"{layer}_output_0" not in tensors, "a MatMul output name now holding MatMul + bias"
    got = report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"]
    assert abs(got - qdq_report["verification"]["outputs"]["last_hidden_state"]["sqnr_db"]) < 0.1
    feed = dict(np.load(files["eval"]))
    feed = {k: v[:1] for k, v in feed.items()}
    (a,), (b,) = run(model, feed), run(qdq_model, feed)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())
