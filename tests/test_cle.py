"""cle: equalization keeps float outputs, equalizes each channel's weight range across the
pair (regular and depthwise second Conv), and leaves pairs split by non-homogeneous
activations alone."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run_batched, to_proto
from test_passes import Graph

RECIPE = "apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n    - type: cle\n"


def chain(second_depthwise: bool, activation: str = "Relu"):
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((6, 3, 3, 3)) * rng.uniform(0.01, 3.0, (6, 1, 1, 1))).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = (rng.standard_normal((6, 1, 3, 3) if second_depthwise else (4, 6, 3, 3)) * 0.3).astype(np.float32)
    act = [helper.make_node("Relu", ["c1"], ["a"], name="/act/Relu")] if activation == "Relu" else \
        [helper.make_node("Clip", ["c1", "zero", "six"], ["a"], name="/act/Clip")]
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="/c1/Conv", pads=[1, 1, 1, 1]), *act,
             helper.make_node("Conv", ["a", "W2"], ["y"], name="/c2/Conv", pads=[1, 1, 1, 1],
                              group=6 if second_depthwise else 1)]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_equalization_keeps_float_outputs_and_equalizes_ranges(pipeline):
    data = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    for depthwise in (False, True):
        model = chain(depthwise)
        ir_model, ctx = pipeline(model, RECIPE, data)
        ref = ort_run_batched(model, "x", data)
        got = ort_run_batched(to_proto(ir_model), "x", data)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        g = Graph(to_proto(ir_model))
        w1 = g.inits[g.node("/c1/Conv").input[1]]
        w2 = g.inits[g.node("/c2/Conv").input[1]]
        r1 = np.abs(w1.reshape(6, -1)).max(axis=1)
        r2 = np.abs(w2.reshape(6, -1)).max(axis=1) if depthwise else np.abs(w2).max(axis=(0, 2, 3))
        np.testing.assert_allclose(r1, r2, rtol=1e-5)
        assert ctx.reports["cle"]["pairs"] == [["/c1/Conv", "/c2/Conv"]]


def test_clip_between_convs_is_left_alone(pipeline):
    data = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    model = chain(False, activation="Clip")
    ir_model, ctx = pipeline(model, RECIPE, data)
    assert ctx.reports["cle"]["pairs"] == [] and "Clip" in ctx.reports["cle"]["skipped"]["/c1/Conv"]
