"""Range-aware placement (quantize.range_guard): a Concat joining pixel-scale boxes with
[0, 1] scores, or a tensor holding mask-sized values, keeps its consumer float. Judged by
class agreement, not only SQNR: with one scale the head keeps a fine SQNR while its class
predictions collapse."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run_batched, to_proto


def head_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    wh = np.zeros((7, 7))  # block-diagonal head: boxes stay boxes, scores stay scores
    wh[:4, :4] = np.eye(4) + rng.standard_normal((4, 4)) * 0.1
    wh[4:, 4:] = np.eye(3) + rng.standard_normal((3, 3)) * 0.1
    inits = {"Wb": rng.standard_normal((16, 4)), "px": np.float32(300.0), "Ws": rng.standard_normal((16, 3)) * 2,
             "Wh": wh}
    n = helper.make_node
    nodes = [n("MatMul", ["x", "Wb"], ["b0"], name="/boxes/MatMul"), n("Mul", ["b0", "px"], ["boxes"], name="/boxes/Mul"),
             n("MatMul", ["x", "Ws"], ["s0"], name="/scores/MatMul"), n("Sigmoid", ["s0"], ["scores"], name="/scores/Sigmoid"),
             n("Concat", ["boxes", "scores"], ["cat"], name="/head/Concat", axis=-1),
             n("MatMul", ["cat", "Wh"], ["y"], name="/head/MatMul")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 7])],
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def recipe(guard: str) -> str:
    return ("apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize\n    - type: calibrate\n"
            "      method: minmax\n    - type: quantize\n      speed_fallback: false\n"
            f"      range_guard: {guard}\n")


def scores_agree(ref, got) -> float:
    return float(np.mean(ref[:, 4:].argmax(1) == got[:, 4:].argmax(1)))


def sqnr(ref, got) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


def test_concat_of_boxes_and_scores_keeps_the_head_float(pipeline):
    model = head_model()
    data = np.random.default_rng(1).standard_normal((256, 16)).astype(np.float32)
    ref = ort_run_batched(model, "x", data)
    one_scale, _ = pipeline(model, recipe("{concat_ratio: 0}"), data)
    guarded, ctx = pipeline(model, recipe("{}"), data)
    plain = ort_run_batched(to_proto(one_scale), "x", data)
    kept = ort_run_batched(to_proto(guarded), "x", data)
    # one scale: the SQNR looks fine (boxes dominate) while the class predictions collapse
    assert sqnr(ref, plain) > 30 and scores_agree(ref, plain) < 0.75
    assert scores_agree(ref, kept) > 0.97
    reason = ctx.layers.to_json()["/head/MatMul"]["reason"]
    assert ctx.layers.to_json()["/head/MatMul"]["status"] == "float" and "range_guard" in reason and "boxes" in reason
    assert ctx.layers.to_json()["/scores/MatMul"]["status"] == "quantized"


def test_extreme_values_keep_the_consumer_float(pipeline):
    """An additive attention-style mask of -3.4e38 on some positions."""
    rng = np.random.default_rng(0)
    inits = {"mask": np.where(rng.random(16) < 0.25, -3.4e38, 0.0), "W": rng.standard_normal((16, 8))}
    nodes = [helper.make_node("Add", ["x", "mask"], ["m"], name="/mask/Add"),
             helper.make_node("MatMul", ["m", "W"], ["y"], name="/fc/MatMul")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, ctx = pipeline(model, recipe("{}"), rng.standard_normal((32, 16)).astype(np.float32))
    rec = ctx.layers.to_json()["/fc/MatMul"]
    assert rec["status"] == "float" and "max_abs" in rec["reason"] and "3.4e+38" in rec["reason"]
