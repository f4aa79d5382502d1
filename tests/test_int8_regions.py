"""quantize's int8 regions (passes/quantize/regions.py): elementwise operators between quantized
tensors get Q/DQ on their outputs so onnxruntime fuses them into its int8 kernels; a region that
would leak into float operators, or that needs a constant input, is not formed; the members'
output parameters come from their calibrated ranges (recomputed here in numpy)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import make_model, ort_run_batched, to_proto
from test_passes import Graph, quantize_recipe

C = 8


def silu_cnn(leak: str | None = None) -> onnx.ModelProto:
    """x → Conv → SiLU → Conv → SiLU ─┬→ Concat → Conv → y   (a YOLOX block, shrunk)
                                       └→ Conv → SiLU ┘
    leak="output": the first SiLU is also a graph output; leak="const": the second SiLU's Mul
    takes a constant factor instead of its Sigmoid."""
    rng = np.random.default_rng(7)
    inits = {name: rng.standard_normal(shape) * 0.4 for name, shape in
             (("W0", (C, 3, 3, 3)), ("W1", (C, C, 3, 3)), ("W2", (C, C, 1, 1)), ("W3", (C, 2 * C, 1, 1)))}
    inits["k"] = np.array([0.7])
    n = helper.make_node

    def silu(x, tag, const=False):
        return [n("Sigmoid", [x], [f"{tag}_sig"], name=f"/{tag}/Sigmoid"),
                n("Mul", [x, "k" if const else f"{tag}_sig"], [f"{tag}_out"], name=f"/{tag}/Mul")]

    nodes = [n("Conv", ["x", "W0"], ["c0"], name="/c0/Conv", pads=[1, 1, 1, 1]), *silu("c0", "a0"),
             n("Conv", ["a0_out", "W1"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1]),
             *silu("c1", "a1", const=leak == "const"),
             n("Conv", ["a1_out", "W2"], ["c2"], name="/c2/Conv"), *silu("c2", "a2"),
             n("Concat", ["a1_out", "a2_out"], ["cat"], name="/cat/Concat", axis=1),
             n("Conv", ["cat", "W3"], ["y"], name="/head/Conv")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C, 16, 16])]
    if leak == "output":
        outputs.append(helper.make_tensor_value_info("a0_out", TensorProto.FLOAT, ["n", C, 16, 16]))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])], outputs,
                      inits, "silu_cnn")


def _data(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_silu_between_int8_convs_runs_in_int8(pipeline, tmp_path):
    model, data = silu_cnn(), _data()
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    out = to_proto(ir_model)
    assert ctx.reports["quantize"]["int8_region"] == {"Concat": 1, "Mul": 3, "Sigmoid": 3}
    g = Graph(out)
    # every Sigmoid output (and the Concat's) goes through its own Q/DQ pair
    for tag in ("a0", "a1", "a2"):
        (reader,) = g.consumers[f"{tag}_sig"]
        assert reader.op_type == "QuantizeLinear", tag
    ops = _optimized_ops(out, tmp_path)
    assert ops.count("QLinearSigmoid") == 3 and ops.count("QLinearMul") == 3 and "QLinearConcat" in ops, ops
    assert "Sigmoid" not in ops and "Mul" not in ops, ops
    # the Sigmoid outputs' parameters are their calibrated min/max as uint8 (numpy, float model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.make_tensor_value_info(f"{t}_sig", TensorProto.FLOAT, None)
                               for t in ("a0", "a1", "a2")])
    import onnxruntime as ort
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sig = [np.concatenate(z) for z in zip(*(sess.run([f"{t}_sig" for t in ("a0", "a1", "a2")],
                                                     {"x": data[i:i + 1]}) for i in range(len(data))))]
    for tag, values in zip(("a0", "a1", "a2"), sig):
        lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
        q = g.consumers[f"{tag}_sig"][0]
        scale, zp = g.inits[q.input[1]], g.inits[q.input[2]]
        assert zp.dtype == np.uint8
        np.testing.assert_allclose(scale, (hi - lo) / 255.0, rtol=1e-5)
        assert int(zp) == int(np.round(-lo / ((hi - lo) / 255.0)))
    # and the int8 graph stays close to the float one
    ref, got = ort_run_batched(model, "x", data), ort_run_batched(out, "x", data)
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    assert sqnr > 25, sqnr


def test_a_region_that_leaks_into_a_graph_output_is_not_formed(pipeline):
    """The first SiLU is also a graph output: its float value must survive, so its Sigmoid and
    Mul stay float; the other two SiLUs and the Concat still join."""
    model, data = silu_cnn("output"), _data()
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    g = Graph(to_proto(ir_model))
    assert ctx.reports["quantize"]["int8_region"] == {"Concat": 1, "Mul": 2, "Sigmoid": 2}
    assert all(c.op_type != "QuantizeLinear" for c in g.consumers["a0_sig"])


def test_a_mul_by_a_constant_does_not_join(pipeline):
    """onnxruntime's QLinearMul fusion needs both inputs quantized: a Mul by a constant stays
    float (reading the Conv output through its DequantizeLinear)."""
    model, data = silu_cnn("const"), _data()
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    g = Graph(to_proto(ir_model))
    assert ctx.reports["quantize"]["int8_region"] == {"Concat": 1, "Mul": 2, "Sigmoid": 2}
    mul = g.node("/a1/Mul")
    assert g.producer[mul.input[0]].op_type == "DequantizeLinear" and mul.input[1] in g.inits


def test_int8_regions_switched_off(pipeline):
    model, data = silu_cnn(), _data()
    ir_model, ctx = pipeline(model, quantize_recipe(int8_regions="false"), data)
    g = Graph(to_proto(ir_model))
    assert ctx.reports["quantize"]["int8_region"] == {}
    assert all(c.op_type != "QuantizeLinear" for t in ("a0", "a1", "a2") for c in g.consumers[f"{t}_sig"])


def test_targets_without_int8_elementwise_form_no_region(pipeline):
    model, data = silu_cnn(), _data()
    _, ctx = pipeline(model, quantize_recipe(activation="{dtype: int8, symmetric: true}"), data,
                      target="ascend310b")
    assert ctx.reports["quantize"]["int8_region"] == {}
