"""qdq_see_through: activation Q/DQ pairs are lifted out for fusion and put back in front of
whatever reads the tensor afterwards — the original consumer, or a fused node that replaced
it — with pairs whose consumers vanished inside a fused op reported, and weight DQs untouched.
Checked against onnxruntime on the graph before lifting."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.passes.rules import qdq_see_through

h = onnx.helper
S, Z = 0.1, 128   # the pair's scale and zero point


def _graph(nodes, inputs, outputs, inits=()):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=8)
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def _vi(name, shape):
    return h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _c(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def _run(model, x):
    proto = ir.to_proto(model)
    proto.ir_version = 8
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _qdq(v):
    return (np.clip(np.round(v / S) + Z, 0, 255) - Z) * S


def _relu_qdq_neg():
    """x -> Relu -> Q -> DQ -> Neg -> y, and Relu's output also read directly by Abs -> z."""
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"), h.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]), h.make_node("Neg", ["dq"], ["y"], name="neg"),
             h.make_node("Abs", ["r"], ["a"], name="abs")]
    return _graph(nodes, [_vi("x", [4])], [_vi("y", [4]), _vi("a", [4])],
                  [_c("s", np.float32(S)), _c("z", np.uint8(Z))])


X = np.array([-1.0, 0.04, 0.26, 3.0], np.float32)


def test_lift_and_restore_round_trip_leaves_the_graph_computing_the_same():
    model = _relu_qdq_neg()
    want = _run(model, X)
    before = {id(n) for n in model.graph}
    lifted = qdq_see_through.lift(model.graph)
    assert len(lifted) == 1 and [n.op_type for n in model.graph] == ["Relu", "Neg", "Abs"]
    assert next(n for n in model.graph if n.name == "neg").inputs[0].name == "r"
    assert qdq_see_through.restore(model.graph, lifted, before) == []
    assert sorted(n.op_type for n in model.graph) == ["Abs", "DequantizeLinear", "Neg", "QuantizeLinear", "Relu"]
    got = _run(model, X)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(got[0], -_qdq(np.maximum(X, 0)), atol=1e-7)   # independent numpy
    np.testing.assert_array_equal(got[1], np.abs(np.maximum(X, 0)))        # the plain reader stays float


def test_a_fused_node_that_replaced_the_consumer_gets_the_pair():
    model = _relu_qdq_neg()
    graph = model.graph
    before = {id(n) for n in graph}
    lifted = qdq_see_through.lift(graph)
    neg = next(n for n in graph if n.name == "neg")   # a "fusion" replaces Neg by Sub(0, r)
    zero = ir.Value(name="zero", const_value=ir.tensor(np.float32(0.0), name="zero"),
                    type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    graph.register_initializer(zero)
    sub = ir.node("Sub", [zero, neg.inputs[0]], name="fused")
    graph.insert_after(neg, sub)
    sub.outputs[0].dtype, sub.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([4])
    ir.convenience.replace_all_uses_with(neg.outputs[0], sub.outputs[0], replace_graph_outputs=True)
    sub.outputs[0].name = "y"
    graph.remove(neg, safe=True)
    assert qdq_see_through.restore(graph, lifted, before) == []
    assert sub.inputs[1].producer().op_type == "DequantizeLinear"
    np.testing.assert_allclose(_run(model, X)[0], -_qdq(np.maximum(X, 0)), atol=1e-7)


def test_a_pair_whose_consumers_vanished_into_a_fused_op_is_reported():
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]), h.make_node("Neg", ["dq"], ["y"], name="neg")]
    model = _graph(nodes, [_vi("x", [4])], [_vi("y", [4])], [_c("s", np.float32(S)), _c("z", np.uint8(Z))])
    graph = model.graph
    before = {id(n) for n in graph}
    lifted = qdq_see_through.lift(graph)
    relu = next(n for n in graph if n.op_type == "Relu")
    neg = next(n for n in graph if n.name == "neg")
    fused = ir.node("Elu", [relu.inputs[0]], name="relu_neg_fused")   # swallowed r entirely
    graph.insert_after(neg, fused)
    fused.outputs[0].dtype, fused.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([4])
    ir.convenience.replace_all_uses_with(neg.outputs[0], fused.outputs[0], replace_graph_outputs=True)
    graph.remove([neg, relu], safe=True)
    assert qdq_see_through.restore(graph, lifted, before) == ["r"]
    assert not [n for n in graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_weight_dequantize_stays_put():
    nodes = [h.make_node("DequantizeLinear", ["wq", "ws"], ["w"]), h.make_node("MatMul", ["x", "w"], ["y"])]
    model = _graph(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 2])],
                   [_c("wq", np.arange(8, dtype=np.int8).reshape(4, 2)), _c("ws", np.float32(0.5))])
    assert qdq_see_through.lift(model.graph) == []
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]
