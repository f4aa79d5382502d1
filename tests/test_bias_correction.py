"""quantize.bias_correction: the bias absorbs the output mean shift of weight rounding,
b' = b - (W_q - W)·E[x], with E[x] per input channel from calibration (numpy reference)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run_batched, to_proto
from test_passes import Graph


def conv_model(groups: int = 1):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 8 // groups, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(8) * 0.1).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1], group=groups)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w, b


def recipe(on: bool) -> str:
    return ("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n    - type: calibrate\n"
            "      method: minmax\n    - type: quantize\n      speed_fallback: false\n"
            "      weight: {dtype: int8, granularity: per_tensor}\n"
            f"      bias_correction: {'true' if on else 'false'}\n")


def test_bias_absorbs_the_weight_rounding_mean_shift(pipeline):
    for groups in (1, 2):
        model, w, b = conv_model(groups)
        rng = np.random.default_rng(1)
        data = (rng.standard_normal((32, 8, 6, 6)) + np.arange(8)[None, :, None, None]).astype(np.float32)
        ir_model, ctx = pipeline(model, recipe(True), data)
        g = Graph(to_proto(ir_model))
        q, s, _, _ = g.dequantized_weight(g.node("/conv/Conv").input[1])
        bq, bs, _, _ = g.dequantized_weight(g.node("/conv/Conv").input[2])
        mean = data.astype(np.float64).mean(axis=(0, 2, 3))
        dw = (q.astype(np.float64) * float(s) - w).sum(axis=(2, 3))              # [Cout, Cin/g]
        cin_g = 8 // groups
        per_o = mean.reshape(groups, cin_g)[np.arange(8) // (8 // groups)]
        want = b - (dw * per_o).sum(axis=1)
        np.testing.assert_allclose(bq * bs, want, atol=float(np.max(bs)))     # int32 bias: one step
        assert "bias corrected" in ctx.layers.to_json()["/conv/Conv"]["note"]


def test_bias_correction_lowers_the_output_mean_error(pipeline):
    model, _, _ = conv_model()
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((64, 8, 6, 6)) * 0.5 + 3.0).astype(np.float32)  # inputs far from zero mean
    ref = ort_run_batched(model, "x", data)
    bias_err = {}
    for on in (False, True):
        m, _ = pipeline(model, recipe(on), data)
        got = ort_run_batched(to_proto(m), "x", data)
        bias_err[on] = float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean())
    assert bias_err[True] < 0.5 * bias_err[False]
