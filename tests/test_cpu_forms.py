"""cpu lowering forms (backends/cpu/forms.py) against the QDQ graph they replace: static int8
MatMuls without output Q/DQ as MatMulInteger (onnxruntime otherwise loses the int8 kernel
behind its MatMul+Add -> Gemm rewrite)."""

from __future__ import annotations

import numpy as np

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


def test_static_matmul_lowers_to_matmulinteger_with_qdq_numbers(tmp_path):
    model = TinyModels(0).mlp(1024, 1024, 8)  # fc1 is big enough for cpu's int8 threshold
    x = TinyModels.data((1024,), 8)
    final, qdq, report = compile_tiny(tmp_path, model, "w8a8", x, target="cpu")  # the host's kernels run it
    assert "MatMulInteger" in ops(final) and report["cpu_forms"]["integer_matmul"] == 1
    layer = report["layers"]["/fc1/MatMul"]
    assert layer["lowered_to"] == "MatMulInteger -> Cast -> Mul"
    assert layer["kernel"] in ("MatMulInteger", "MatMulIntegerToFloat")
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
    assert "MatMulInteger" not in ops(final) and report["cpu_forms"]["integer_matmul"] == 0
    assert report["layers"]["/fc1/MatMul"]["kernel"] == "QLinearMatMul"
