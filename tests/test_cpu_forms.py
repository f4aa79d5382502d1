"""cpu lowering forms (backends/cpu/forms.py) against the QDQ graph they replace: static int8
MatMuls without output Q/DQ as MatMulInteger (onnxruntime otherwise loses the int8 kernel
behind its MatMul+Add -> Gemm rewrite)."""

from __future__ import annotations

import numpy as np

from conftest import TinyModels
from test_schemes import compile_tiny, ops, run


def test_static_matmul_lowers_to_matmulinteger_with_qdq_numbers(tmp_path):
    model = TinyModels(0).mlp(1024, 1024, 8)  # fc1 is big enough for cpu's int8 threshold
    x = TinyModels.data((1024,), 8)
    final, qdq, report = compile_tiny(tmp_path, model, "w8a8", x)
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
