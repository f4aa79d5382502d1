"""canonicalize (float-preserving: checked against onnxruntime on the original graph) and
quantize (QDQ structure, parameters recomputed in numpy, error vs the float model)."""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import TinyModels, make_model, ort_run_batched, to_proto
from qcompile.passes.quantize import Quantize

RTOL, ATOL = 1e-4, 1e-5


# -- recipes --------------------------------------------------------------------------------------
def canonicalize_recipe(**options) -> str:
    opts = "".join(f"\n      {k}: {v}" for k, v in options.items())
    return f"apiversion: qcompile/v1\nspec:\n  passes:\n    - type: canonicalize{opts}\n"


def quantize_recipe(method: str = "minmax", activation: str | None = "{dtype: uint8, symmetric: false}",
                    **quant) -> str:
    """canonicalize -> calibrate -> quantize. Every candidate layer is meant to be quantized
    in these tests, so the target's speed fallback (small layers stay float) is turned off
    where the quantize pass has that option."""
    fields = {f.name for f in dataclasses.fields(Quantize.Config)}
    if "speed_fallback" in fields:
        quant.setdefault("speed_fallback", "false")
    quant["activation"] = activation if activation is not None else "null"
    lines = ["- type: canonicalize"]
    if activation is not None:
        lines.append(f"- type: calibrate\n  method: {method}")
    lines.append("- type: quantize" + "".join(f"\n  {k}: {v}" for k, v in quant.items()))
    body = textwrap.indent("\n".join(lines) + "\n", "    ")
    return "apiversion: qcompile/v1\nspec:\n  passes:\n" + body


# -- graph inspection helpers ------------------------------------------------------------------------
class Graph:
    """Read-only view of a ModelProto: producers, consumers, initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def node(self, name: str):
        (found,) = [n for n in self.nodes if n.name == name]
        return found

    def ops(self, op_type: str) -> list:
        return [n for n in self.nodes if n.op_type == op_type]

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def dequantized_weight(self, tensor: str):
        """(int array, scale, zero point, axis) of a weight read through DequantizeLinear."""
        dq = self.producer[tensor]
        assert dq.op_type == "DequantizeLinear"
        q_name, s_name, z_name = dq.input
        assert q_name in self.inits and q_name not in self.producer
        return self.inits[q_name], self.inits[s_name], self.inits[z_name], self.attr(dq, "axis")

    def activation_qparams(self, tensor: str):
        """(scale, zero point) of the Q->DQ pair that `tensor` reaches a consumer through."""
        dq = self.producer[tensor]
        assert dq.op_type == "DequantizeLinear", f"{tensor} is produced by {dq.op_type}"
        q = self.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        assert q.input[1] == dq.input[1] and q.input[2] == dq.input[2]  # one shared pair of params
        return self.inits[q.input[1]], self.inits[q.input[2]], q.input[0]


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


# -- canonicalize ----------------------------------------------------------------------------------
def test_canonicalize_folds_batchnorm_and_keeps_outputs(tiny, pipeline):
    model = tiny.conv_bn_relu()
    data = tiny.data((3, 8, 8), n=8)
    ir_model, ctx = pipeline(model, canonicalize_recipe(), data)
    out = to_proto(ir_model)
    ops = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    ref = ort_run_batched(model, "x", data)
    got = ort_run_batched(out, "x", data)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert ctx.reports["canonicalize"]["nodes_after"] < ctx.reports["canonicalize"]["nodes_before"]


def test_canonicalize_without_bn_fusion_keeps_batchnorm(tiny, pipeline):
    model = tiny.conv_bn_relu()
    data = tiny.data((3, 8, 8), n=4)
    ir_model, _ = pipeline(model, canonicalize_recipe(fuse_batchnorm="false", fold_constants="false"), data)
    out = to_proto(ir_model)
    assert "BatchNormalization" in [n.op_type for n in out.graph.node]
    np.testing.assert_allclose(ort_run_batched(out, "x", data), ort_run_batched(model, "x", data),
                               rtol=RTOL, atol=ATOL)


def test_canonicalize_small_cnn(small_cnn_files, pipeline):
    model = onnx.load(small_cnn_files["model"])
    calib = np.load(small_cnn_files["calib"])["x"][:8]
    ir_model, _ = pipeline(model, canonicalize_recipe(), calib)
    out = to_proto(ir_model)
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    np.testing.assert_allclose(ort_run_batched(out, "x", calib), ort_run_batched(model, "x", calib),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("form,builder,gone", [
    ("to_matmul_add", "gemm", "Gemm"),
    ("from_matmul_add", "mlp", "Add"),
])
def test_canonicalize_gemm_normal_forms(tiny, pipeline, form, builder, gone):
    model = getattr(tiny, builder)()
    data = tiny.data((16,), n=8)
    ir_model, _ = pipeline(model, canonicalize_recipe(gemm=form), data)
    out = to_proto(ir_model)
    assert gone not in [n.op_type for n in out.graph.node]
    np.testing.assert_allclose(ort_run_batched(out, "x", data), ort_run_batched(model, "x", data),
                               rtol=RTOL, atol=ATOL)


# -- quantize: structure ----------------------------------------------------------------------------
def test_mlp_weights_are_int8_behind_dequantize(tiny, pipeline):
    model = tiny.mlp()
    weights = tiny.weights(model)
    data = tiny.data((16,), n=32)
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    g = Graph(to_proto(ir_model))
    for name, w_name in (("/fc1/MatMul", "W1"), ("/fc2/MatMul", "W2")):
        assert ctx.layers.to_json()[name]["status"] == "quantized"
        node = g.node(name)
        q, scale, zp, axis = g.dequantized_weight(node.input[1])
        assert q.dtype == np.int8 and zp.dtype == np.int8 and np.all(zp == 0)
        assert axis == 1  # MatMul weight [K, N]: one scale per output column
        w = weights[w_name].astype(np.float32)
        ref_scale = np.abs(w).max(axis=0) / 127.0
        np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
        np.testing.assert_array_equal(q, np.clip(np.rint(w / scale.astype(np.float32)), -127, 127))
    # no float copy of a quantized weight is left in the model
    float_inits = {k for k, v in g.inits.items() if v.dtype == np.float32 and v.ndim >= 2}
    assert not float_inits & {"W1", "W2"}


def test_one_quantize_linear_per_activation_tensor(tiny, pipeline):
    model = tiny.mlp()
    data = tiny.data((16,), n=16)
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    g = Graph(to_proto(ir_model))
    q_inputs = [n.input[0] for n in g.ops("QuantizeLinear")]
    assert len(q_inputs) == len(set(q_inputs))
    # every activation input of a quantized layer comes through a Q/DQ pair
    for name in ("/fc1/MatMul", "/fc2/MatMul"):
        g.activation_qparams(g.node(name).input[0])
    assert {"x"} <= set(q_inputs)


@pytest.mark.parametrize("mode,quantized_outputs", [("conv", set()), ("all", {"h1"})])
def test_matmul_outputs_quantized_only_when_asked(tiny, pipeline, mode, quantized_outputs):
    """MatMul/Gemm outputs stay float by default: onnxruntime fuses DQ->MatMul without an
    output Q (MatMulIntegerToFloat), and an output feeding a residual keeps its outliers."""
    ir_model, _ = pipeline(tiny.mlp(), quantize_recipe(output_quantization=mode, fold_activations="false"),
                           tiny.data((16,), n=16))
    g = Graph(to_proto(ir_model))
    q_inputs = {n.input[0] for n in g.ops("QuantizeLinear")}
    # h3 (after ReLU) is fc2's input either way; fc1's output h1 only with `all` (y, a bare graph
    # output with no consumer, keeps its float value)
    assert q_inputs & {"h1", "y"} == quantized_outputs and {"x", "h3"} <= q_inputs


def test_shared_activation_gets_one_quantize_linear(tiny, pipeline):
    model = tiny.shared_input()
    data = tiny.data((16,), n=16)
    ir_model, _ = pipeline(model, quantize_recipe(), data)
    g = Graph(to_proto(ir_model))
    on_x = [n for n in g.ops("QuantizeLinear") if n.input[0] == "x"]
    assert len(on_x) == 1
    a_in, b_in = g.node("/a/MatMul").input[0], g.node("/b/MatMul").input[0]
    assert a_in == b_in  # both consumers read the same DequantizeLinear output
    assert g.producer[a_in].input[0] == on_x[0].output[0]
    # the float model's semantics are kept within quantization error
    ref = ort_run_batched(model, "x", data)
    got = ort_run_batched(g.model, "x", data)
    assert sqnr(ref, got) > 30


def test_gemm_transb_per_channel_scales_and_int32_bias(tiny, pipeline):
    model = tiny.gemm()
    weights = tiny.weights(model)
    data = tiny.data((16,), n=48, seed=5)
    ir_model, ctx = pipeline(model, quantize_recipe(method="minmax"), data)
    assert ctx.layers.to_json()["/fc/Gemm"]["status"] == "quantized"
    g = Graph(to_proto(ir_model))
    node = g.node("/fc/Gemm")

    # activation: uint8 asymmetric over the exact calibration min/max (widened to 0)
    s_x, zp_x, src = g.activation_qparams(node.input[0])
    assert src == "x" and zp_x.dtype == np.uint8
    lo, hi = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
    assert float(s_x) == pytest.approx((hi - lo) / 255.0, rel=1e-6)
    assert int(zp_x) == int(np.rint(-lo / ((hi - lo) / 255.0)))

    # weight [N, K] with transB=1: one scale per output row, absmax / 127
    w = weights["W"].astype(np.float32)
    q_w, s_w, zp_w, axis = g.dequantized_weight(node.input[1])
    assert axis == 0 and q_w.dtype == np.int8 and np.all(zp_w == 0)
    np.testing.assert_allclose(s_w, np.abs(w).max(axis=1) / 127.0, rtol=1e-6)
    np.testing.assert_array_equal(q_w, np.clip(np.rint(w / s_w[:, None]), -127, 127))

    # bias: int32 at scale s_x * s_w, zero point 0
    b = weights["b"].astype(np.float64)
    q_b, s_b, zp_b, b_axis = g.dequantized_weight(node.input[2])
    assert q_b.dtype == np.int32 and np.all(zp_b == 0)
    np.testing.assert_allclose(s_b, np.float32(s_x) * s_w, rtol=1e-6)
    np.testing.assert_array_equal(q_b, np.rint(b / (float(s_x) * s_w.astype(np.float64))).astype(np.int32))

    # the QDQ graph computes exactly the fake-quantized Gemm (numpy reference)
    x_hat = (np.clip(np.rint(data / np.float32(s_x)) + int(zp_x), 0, 255) - int(zp_x)) * np.float32(s_x)
    w_hat = q_w.astype(np.float32) * s_w[:, None]
    ref = x_hat.astype(np.float64) @ w_hat.T.astype(np.float64) + q_b.astype(np.float64) * s_b
    got = ort_run_batched(g.model, "x", data)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # and stays close to the float Gemm
    assert sqnr(ort_run_batched(model, "x", data), got) > 30


def test_gemm_with_row_vector_bias(tiny, pipeline):
    model = tiny.gemm(bias_shape=(1, 8))
    data = tiny.data((16,), n=16)
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    assert ctx.layers.to_json()["/fc/Gemm"]["status"] == "quantized"
    got = ort_run_batched(to_proto(ir_model), "x", data)
    assert sqnr(ort_run_batched(model, "x", data), got) > 30


def test_conv_per_channel_scales_on_small_cnn(small_cnn_files, pipeline):
    model = onnx.load(small_cnn_files["model"])
    weights = TinyModels.weights(model)
    calib = np.load(small_cnn_files["calib"])["x"][:8]
    ir_model, ctx = pipeline(model, quantize_recipe(), calib)
    g = Graph(to_proto(ir_model))
    for name, w_name in (("/down/conv/Conv", "down.w"), ("/dw/conv/Conv", "dw.w"), ("/pw/conv/Conv", "pw.w")):
        assert ctx.layers.to_json()[name]["status"] == "quantized"
        q, scale, zp, axis = g.dequantized_weight(g.node(name).input[1])
        w = weights[w_name]
        assert axis == 0 and q.dtype == np.int8 and q.shape == w.shape
        ref = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127.0
        np.testing.assert_allclose(scale, ref, rtol=1e-6)
        np.testing.assert_array_equal(q, np.clip(np.rint(w / scale[:, None, None, None]), -127, 127))
    assert "stem.w" not in g.inits and "down.w" not in g.inits  # float weights dropped


def test_per_tensor_weights(tiny, pipeline):
    model = tiny.mlp()
    w1 = tiny.weights(model)["W1"]
    ir_model, _ = pipeline(model, quantize_recipe(weight="{granularity: per_tensor}"), tiny.data((16,), n=8))
    g = Graph(to_proto(ir_model))
    q, scale, zp, axis = g.dequantized_weight(g.node("/fc1/MatMul").input[1])
    assert axis is None and scale.shape == () and zp.shape == ()
    assert float(scale) == pytest.approx(float(np.abs(w1).max()) / 127.0, rel=1e-6)
    np.testing.assert_array_equal(q, np.clip(np.rint(w1 / np.float32(scale)), -127, 127))


# -- include / exclude --------------------------------------------------------------------------------
@pytest.mark.parametrize("option,reason_word", [
    ("exclude: ['/fc2/*']", "exclude"),
    ("include: ['/fc1/*']", "include"),
])
def test_scoped_layers_stay_float_with_a_reason(tiny, pipeline, option, reason_word):
    model = tiny.mlp()
    key, value = option.split(": ", 1)
    ir_model, ctx = pipeline(model, quantize_recipe(**{key: value}), tiny.data((16,), n=8))
    assert ctx.layers.to_json()["/fc1/MatMul"]["status"] == "quantized"
    rec = ctx.layers.to_json()["/fc2/MatMul"]
    assert rec["status"] == "float" and reason_word in rec["reason"]
    g = Graph(to_proto(ir_model))
    w_in = g.node("/fc2/MatMul").input[1]
    assert w_in in g.inits and g.inits[w_in].dtype == np.float32  # the float weight, untouched
    np.testing.assert_array_equal(g.inits[w_in], tiny.weights(model)["W2"])
    assert g.producer.get(w_in) is None


def test_op_types_filter(tiny, pipeline):
    ir_model, ctx = pipeline(tiny.gemm(), quantize_recipe(op_types="[MatMul]"), tiny.data((16,), n=8))
    rec = ctx.layers.to_json()["/fc/Gemm"]
    assert rec["status"] == "float" and "op_types" in rec["reason"]
    assert not Graph(to_proto(ir_model)).ops("QuantizeLinear")


# -- quantize: accuracy ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cnn_quantized(small_cnn_files, tmp_path_factory):
    """w8a8 over the small CNN (calibrated on calib.npz) via the pipeline, all layers quantized."""
    from qcompile.calib_data import model_input_specs, open_dataset, shapes_from_data
    from qcompile.pass_context import PassContext
    from qcompile.model_io import fix_input_shapes, load_model
    from qcompile.pipeline import run_pipeline
    from qcompile.recipe import load_recipe
    from qcompile.targets import load_target

    rpath = tmp_path_factory.mktemp("recipe") / "w8a8_all.yaml"
    rpath.write_text(quantize_recipe(method="minmax"))
    model = load_model(small_cnn_files["model"])
    dataset = open_dataset(small_cnn_files["calib"], model_input_specs(model))
    fix_input_shapes(model, shapes_from_data(dataset))
    ctx = PassContext(target=load_target("cpu:avx2"), data=dataset, progress=False)
    model = run_pipeline(model, load_recipe(str(rpath)), ctx)
    return to_proto(model), ctx


def test_small_cnn_quantized_within_expected_error(small_cnn_files, small_cnn_quantized):
    qmodel, ctx = small_cnn_quantized
    assert all(r["status"] == "quantized" for r in ctx.layers.to_json().values()), ctx.layers
    x = np.load(small_cnn_files["eval"])["x"][:32]
    ref = ort_run_batched(onnx.load(small_cnn_files["model"]), "x", x)
    got = ort_run_batched(qmodel, "x", x)
    assert sqnr(ref, got) > 25
    # and it is really quantized: not the float model in disguise
    assert np.max(np.abs(ref - got)) > 0


def test_small_cnn_relu_and_clip_folded(small_cnn_quantized):
    qmodel, ctx = small_cnn_quantized
    ops = [n.op_type for n in qmodel.graph.node]
    assert "Relu" not in ops and "Clip" not in ops
    folded = sorted(r.get("folded", "") for r in ctx.layers.to_json().values())
    assert folded.count("Relu") == 3 and folded.count("Clip") == 1
    # a folded ReLU leaves a uint8 zero point of 0 on the layer output: Q saturates at 0
    g = Graph(qmodel)
    for name in ("/down/conv/Conv", "/pw/conv/Conv"):
        out = g.node(name).output[0]
        (q,) = [n for n in g.consumers[out] if n.op_type == "QuantizeLinear"]
        assert int(g.inits[q.input[2]]) == 0


def test_weight_only_w8a16_has_no_activation_quantization(small_cnn_files, pipeline):
    model = onnx.load(small_cnn_files["model"])
    calib = np.load(small_cnn_files["calib"])["x"][:8]
    ir_model, ctx = pipeline(model, "w8a16", calib)
    g = Graph(to_proto(ir_model))
    assert not g.ops("QuantizeLinear")
    assert all(r["status"] == "quantized" and r["activation"] == "float" for r in ctx.layers.to_json().values())
    for conv in g.ops("Conv"):
        q, _, _, _ = g.dequantized_weight(conv.input[1])
        assert q.dtype == np.int8
    x = np.load(small_cnn_files["eval"])["x"][:8]
    assert sqnr(ort_run_batched(model, "x", x), ort_run_batched(g.model, "x", x)) > 35


def test_quantize_is_deterministic(tiny, pipeline):
    model = tiny.mlp()
    data = tiny.data((16,), n=16)
    a, _ = pipeline(model, quantize_recipe(), data)
    b, _ = pipeline(model, quantize_recipe(), data)
    assert to_proto(a).SerializeToString() == to_proto(b).SerializeToString()



# -- canonicalize: HardSwish fusion ----------------------------------------------------------------
def _hardswish_model(kind: str) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    def const(name, value):
        return numpy_helper.from_array(np.array(value, np.float32), name)

    if kind == "relu6_div6":      # x * relu6(x + 3) / 6: HardSwish
        nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                 helper.make_node("Mul", ["x", "r"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
        inits = [const("three", 3.0), const("zero", 0.0), const("six", 6.0)]
    elif kind == "hardsigmoid":   # x * HardSigmoid(x; 1/6, 0.5): HardSwish
        nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
                 helper.make_node("Mul", ["x", "h"], ["y"])]
        inits = []
    elif kind == "hardsigmoid_default":  # ONNX default alpha 0.2: not HardSwish
        nodes = [helper.make_node("HardSigmoid", ["x"], ["h"]), helper.make_node("Mul", ["x", "h"], ["y"])]
        inits = []
    else:                          # x * relu6(x + 3) / 5: not HardSwish
        nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
                 helper.make_node("Mul", ["x", "r"], ["m"]), helper.make_node("Div", ["m", "five"], ["y"])]
        inits = [const("three", 3.0), const("zero", 0.0), const("six", 6.0), const("five", 5.0)]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 50])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind,fused", [("relu6_div6", True), ("hardsigmoid", True),
                                        ("hardsigmoid_default", False), ("relu6_div5", False)])
def test_canonicalize_hardswish_fusion_keeps_outputs(pipeline, kind, fused):
    model = _hardswish_model(kind)
    data = np.linspace(-7, 7, 50 * 6, dtype=np.float32).reshape(6, 50)
    ir_model, _ = pipeline(model, canonicalize_recipe(), data)
    out = to_proto(ir_model)
    ops = [n.op_type for n in out.graph.node]
    assert (ops == ["HardSwish"]) == fused, ops
    np.testing.assert_allclose(ort_run_batched(out, "x", data), ort_run_batched(model, "x", data),
                               rtol=RTOL, atol=ATOL)


# -- canonicalize: a Conv's affine shift into its bias ------------------------------------------------
def _conv_affine_model(scale, shift, *, bias: bool = True, extra_reader: bool = False,
                       const_first: bool = False) -> onnx.ModelProto:
    """x → Conv → Mul(scale) → Add(shift) → Relu (PP-LCNet's learnable affine after a Conv);
    `const_first`: the constants as the first operands, as Paddle2ONNX writes them."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(4)
    inits = {"W": rng.standard_normal((6, 3, 3, 3)), "c": scale, "d": shift}
    conv_in = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(6)
        conv_in.append("B")
    nodes = [helper.make_node("Conv", conv_in, ["y"], name="/c/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "y"] if const_first else ["y", "c"], ["m"], name="/a/Mul"),
             helper.make_node("Add", ["d", "m"] if const_first else ["m", "d"], ["t"], name="/a/Add"),
             helper.make_node("Relu", ["t"], ["out"], name="/r/Relu")]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 6, 8, 8])]
    if extra_reader:                           # the Conv output has a second reader
        nodes.append(helper.make_node("Sigmoid", ["y"], ["side"], name="/side/Sigmoid"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["n", 6, 8, 8]))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])], outputs,
                      inits, "conv_affine")


@pytest.mark.parametrize("scale,shift,bias,const_first", [
    ([1.7], [0.4], True, False),                                            # one value each (PP-LCNet)
    ([1.7], [0.4], True, True),                                             # Paddle2ONNX's operand order
    (np.linspace(-2, 2.5, 6).reshape(6, 1, 1), [-0.3], False, False),      # per channel, no Conv bias
    ([0.9], np.linspace(-1, 1, 6).reshape(1, 6, 1, 1), True, True),        # per-channel shift, rank 4
])
def test_canonicalize_moves_a_conv_affine_shift_into_the_bias(pipeline, scale, shift, bias, const_first):
    model = _conv_affine_model(scale, shift, bias=bias, const_first=const_first)
    data = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ir_model, _ = pipeline(model, canonicalize_recipe(), data)
    out = to_proto(ir_model)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Mul", "Relu"]
    assert [n.name for n in out.graph.node][0] == "/c/Conv"            # the exporter's name survives
    np.testing.assert_allclose(ort_run_batched(out, "x", data), ort_run_batched(model, "x", data),
                               rtol=RTOL, atol=ATOL)
    # the new bias is the old one plus shift / scale, checked in numpy
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    conv = out.graph.node[0]
    old = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "B")) if bias else 0.0
    want = old + np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (6,)) / \
        np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (6,))
    np.testing.assert_allclose(inits[conv.input[2]], want, rtol=1e-6)


@pytest.mark.parametrize("case", ["zero_scale", "second_reader", "switched_off"])
def test_canonicalize_leaves_an_affine_it_cannot_fold(pipeline, case):
    scale = [1.0, 0.0, 2.0, 1.0, 1.0, 1.0] if case == "zero_scale" else [1.5]
    model = _conv_affine_model(np.reshape(scale, (-1, 1, 1)), [0.2], extra_reader=case == "second_reader")
    data = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    recipe = canonicalize_recipe(fold_affine_bias="false") if case == "switched_off" else canonicalize_recipe()
    ir_model, _ = pipeline(model, recipe, data)
    ops = [n.op_type for n in to_proto(ir_model).graph.node]
    assert "Add" in ops, ops


# -- names survive canonicalize -----------------------------------------------------------------------
def test_exclude_by_exporter_name_after_batchnorm_fusion(small_cnn_files, pipeline):
    model = onnx.load(small_cnn_files["model"])
    calib = np.load(small_cnn_files["calib"])["x"][:4]
    ir_model, ctx = pipeline(model, quantize_recipe(exclude="['/stem/*']"), calib)
    g = Graph(to_proto(ir_model))
    stem = g.ops("Conv")[0]  # the graph is topologically sorted: the first Conv is the stem
    assert stem.input[0] == "x"  # reads the model input directly, not through Q/DQ
    assert g.producer.get(stem.input[1]) is None  # its weight is a float initializer
    assert g.inits[stem.input[1]].dtype == np.float32
    assert ctx.layers.to_json()[stem.name]["status"] == "float"


# -- quantize: a MatMul of two activations ----------------------------------------------------------
def test_matmul_of_two_activations_quantizes_both_inputs(pipeline):
    from onnx import TensorProto, helper
    rng = np.random.default_rng(3)
    wq = rng.standard_normal((8, 8)).astype(np.float32) * 0.3
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="/q/MatMul"),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="/t/Transpose"),
             helper.make_node("MatMul", ["q", "xt"], ["y"], name="/scores/MatMul")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 4])],
                              initializer=[numpy_helper.from_array(wq, "Wq")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = rng.standard_normal((16, 4, 8)).astype(np.float32)
    ir_model, ctx = pipeline(model, quantize_recipe(), data)
    assert ctx.layers.to_json()["/scores/MatMul"]["status"] == "quantized"
    g = Graph(to_proto(ir_model))
    scores = g.node("/scores/MatMul")
    for tensor in scores.input:  # both operands arrive through a Q/DQ pair
        g.activation_qparams(tensor)
    assert sqnr(ort_run_batched(model, "x", data), ort_run_batched(g.model, "x", data)) > 25


@pytest.mark.parametrize("weight,qdtype,qmin,qmax,zp_ref", [
    ("{reduce_range: true}", np.int8, -63, 63, 0),               # 7-bit: restricted [-63, 63]
    ("{dtype: uint8, symmetric: true}", np.uint8, 1, 255, 128),  # symmetric uint8 around 128
])
def test_weight_schemes(tiny, pipeline, weight, qdtype, qmin, qmax, zp_ref):
    model = tiny.gemm()
    w = tiny.weights(model)["W"].astype(np.float32)
    data = tiny.data((16,), n=16)
    ir_model, ctx = pipeline(model, quantize_recipe(weight=weight), data)
    g = Graph(to_proto(ir_model))
    q, scale, zp, axis = g.dequantized_weight(g.node("/fc/Gemm").input[1])
    assert q.dtype == qdtype and axis == 0 and np.all(zp.astype(np.int64) == zp_ref)
    half = (qmax - qmin) // 2
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / half, rtol=1e-6)
    ref = np.clip(np.rint(w / scale[:, None]) + zp_ref, qmin, qmax)
    np.testing.assert_array_equal(q.astype(np.int64), ref.astype(np.int64))
    assert sqnr(ort_run_batched(model, "x", data), ort_run_batched(g.model, "x", data)) > 25


@pytest.mark.parametrize("through", [True, False])
def test_conv_feeding_a_graph_output(tiny, pipeline, through):
    model = tiny.conv_bn_relu()
    del model.graph.node[2]           # drop the Relu: the BatchNorm (then the fused Conv) output is the graph output
    model.graph.output[0].name = "n"
    data = tiny.data((3, 8, 8), n=16)
    ir_model, ctx = pipeline(model, quantize_recipe(quantize_graph_outputs=str(through).lower()), data)
    g = Graph(to_proto(ir_model))
    assert [o.name for o in g.model.graph.output] == ["n"]  # the output keeps its name
    producer = g.producer["n"].op_type
    assert producer == ("DequantizeLinear" if through else "Conv")
    (conv,) = g.ops("Conv")
    assert ctx.layers.to_json()[conv.name]["status"] == "quantized"
    assert sqnr(ort_run_batched(model, "x", data), ort_run_batched(g.model, "x", data)) > 25


def test_avx2_matmul_weights_get_7_bits_where_its_u8s8_kernels_saturate(tiny, pipeline):
    """cpu:avx2's descriptor lists MatMul/Gemm as saturating 8-bit U8S8 weights (onnxruntime's
    vpmaddubsw int16 pair sums): those weights are quantized to [-63, 63], with a note; Conv is not."""
    model = tiny.mlp()
    weights = tiny.weights(model)
    ir_model, ctx = pipeline(model, quantize_recipe(), tiny.data((16,), n=32), target="cpu:avx2")
    g = Graph(to_proto(ir_model))
    for name, w_name in (("/fc1/MatMul", "W1"), ("/fc2/MatMul", "W2")):
        q, scale, _, _ = g.dequantized_weight(g.node(name).input[1])
        w = weights[w_name].astype(np.float32)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 63.0, rtol=1e-6)
        assert np.abs(q).max() == 63
        record = ctx.layers.to_json()[name]
        assert "7-bit" in record["note"] and record["weight"] == "int8 per_channel 7-bit"
    conv_model = tiny.conv_bn_relu()
    _, ctx = pipeline(conv_model, quantize_recipe(), tiny.data((3, 8, 8), n=8), target="cpu:avx2")
    assert "7-bit" not in ctx.layers.to_json()["/conv/Conv"]["weight"]
