"""QDQ -> Ascend rewrite rules (onnxscript patterns, module-level rule sets).

A quantized layer in the QDQ mid-level form

    DequantizeLinear(QuantizeLinear(x)) ─┐
    int8 W ─> DequantizeLinear ──────────┼─> Conv | Gemm | MatMul [-> Add(bias)] ─> y
    int32 b ─> DequantizeLinear ─────────┘

becomes what ATC fuses into its int8 cube kernels

    x ─> AscendQuant(scale=1/s_x, offset=zp_x) ─> Conv | Gemm | MatMul (int8 W, int32 b) [-> Add(int32 b)]
      ─> AscendDequant(deq_scale = uint64(float32 bits of s_x·s_w)) ─> y

Weight-only layers keep a float activation: int8 W ─> AscendAntiQuant ─> Cast ─> Mul(scale).

The rules hold no state: what they need from the compile travels on the graph. Before
applying them, `annotate` marks each layer node with the quantize pass's decision
(`w8a8` / `weight_only`) and the graph with the lowering options (round mode, AscendQuant's
compute dtype); each rewrite marks the node it builds with what it became (`lowered_as`).
A check that refuses a quantized layer fails with that layer as its failure source, so a
`Refusals` tracer run over the rules after rewriting says why each layer stayed float. One
AscendQuant serves every consumer of a quantized tensor: a rewrite reuses an existing one.

(Over 400 lines on purpose: the five rules share their checks and their rewrite tail, and
splitting them from those would put each rule's reasoning in two files.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, RewriteRuleClassBase, RewriteRuleSet

from . import formulas
from .qdq_form import (activation_problem, bias_add, const, deq_matches_bias, deq_scales, dequantized_bias,
                       dq_axis, initializer, int32_bias, weight_params)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
DECISION = "qcompile.quantized"          # node meta: "w8a8" | "weight_only"
OPTIONS = "qcompile.ascend.options"      # graph meta: LoweringOptions
LOWERED = "qcompile.ascend.lowered"      # node meta: what a rule made of the layer


@dataclasses.dataclass(frozen=True)
class LoweringOptions:
    round_mode: str = "Round"
    compute_dtype: str = "float16"        # AscendQuant arithmetic (descriptor: quant_compute_dtype)


def annotate(graph: ir.Graph, layers, options: LoweringOptions) -> None:
    """Mark the quantize pass's decisions on the layer nodes and the options on the graph."""
    graph.meta[OPTIONS] = options
    decided = {r.name: r for r in layers.quantized()}
    for node in graph:
        record = decided.get(node.name or "")
        if record is not None:
            node.meta[DECISION] = "weight_only" if record.weight_only else "w8a8"


def lowered_as(node: ir.Node) -> dict | None:
    """What a lowering rule made of this layer node (None: it was not lowered)."""
    return node.meta.get(LOWERED)


def is_quantized_layer(node: ir.Node, *, weight_only: bool = False) -> bool:
    """A layer the quantize pass quantized (W8A8, or weight-only)."""
    return node.meta.get(DECISION) == ("weight_only" if weight_only else "w8a8")


def _typed(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None, name: str | None = None) -> ir.Value:
    value.dtype = dtype
    if shape is not None:
        value.shape = ir.Shape(list(shape))
    if name:
        value.name = name
    return value


def _name_producer(value: ir.Value, name: str) -> ir.Value:
    value.producer().name = name
    return value


# -- the shared checks and the shared tail ----------------------------------------------------------
def _refuse(result: MatchResult, layer: ir.Node, reason: str) -> MatchResult:
    """Fail the match for a quantized layer this rule cannot lower (the layer is the failure source)."""
    return result.fail(reason, failure_source=layer)


def _layer_check(result: MatchResult, node: ir.Node, x, x_scale, x_zp, w_q, w_scale, w_zp
                 ) -> MatchResult | tuple[np.ndarray, np.ndarray]:
    """What every lowered layer needs: a quantized layer, a lowerable activation Q/DQ and int8
    weights. Returns (weights, weight scales) or the failed match."""
    if not is_quantized_layer(node):
        return result.fail("not a quantized layer")
    problem = activation_problem(x, x_scale, x_zp)
    if problem:
        return _refuse(result, node, problem)
    params = weight_params(w_q, w_scale, w_zp)
    return _refuse(result, node, params) if isinstance(params, str) else params


def _bias_check(result: MatchResult, node: ir.Node, x_scale, s: np.ndarray) -> MatchResult | None:
    """A bias input, if the layer has one, must be DQ(int32, zero point 0) at scale s_x·s_w."""
    if len(node.inputs) <= 2 or node.inputs[2] is None:
        return None
    bias = dequantized_bias(node)
    if bias is None:  # quantize kept it float (its note says why)
        return result.fail("bias is not dequantized from int32")
    b_q, b_scale, b_zp = bias
    if const(b_q) is None or b_q.dtype != ir.DataType.INT32 or np.any(const(b_zp) != 0):
        return _refuse(result, node, "bias is not a constant int32 with zero point 0")
    if not deq_matches_bias(x_scale, s, b_scale):
        return _refuse(result, node, "bias scale is not s_x*s_w")
    return None


def _quant(op, x: ir.Value, x_scale: ir.Value, x_zp: ir.Value, options: LoweringOptions) -> ir.Value:
    """The AscendQuant of `x`: the one already in the graph for these attributes, else a new one."""
    attrs = formulas.quant_attributes(float(const(x_scale).reshape(())), int(const(x_zp).reshape(())),
                                      round_mode=options.round_mode, compute_dtype=options.compute_dtype)
    for use in x.uses():
        user = use.node
        if user.op_type == "AscendQuant" and user.graph is not None and \
                {k: a.value for k, a in user.attributes.items()} == attrs:
            return user.outputs[0]
    q = op.AscendQuant(x, **attrs)
    _typed(q, ir.DataType.INT8, x.shape, f"{x.name}_ascend_int8")
    return _name_producer(q, f"{x.name}_AscendQuant")


def _close(op, graph: ir.Graph, layer: ir.Node, acc: ir.Value, deq: np.ndarray, like: ir.Value, ascend: str,
           bias: str | None, **extra) -> ir.Value:
    """Mark what the layer became and close it with AscendDequant."""
    packed = formulas.pack_deq_scale(deq)
    deq_v = initializer(op, graph, packed, f"{layer.name}_deq_scale")
    out = op.AscendDequant(acc, deq_v, dtype=0, sqrt_mode=0, relu_flag=0)
    _typed(out, ir.DataType.FLOAT, like.shape)
    acc.producer().meta[LOWERED] = {"ascend": ascend,
                                    "deq_scale": f"per_channel [{deq.size}]" if deq.size > 1 else "per_tensor",
                                    "bias": bias, **extra}
    return _name_producer(out, f"{layer.name}_AscendDequant")


def _int8_layer(op, node: ir.Node, inputs: list, attrs: dict, y: ir.Value) -> ir.Value:
    """The layer's op on int8 inputs, accumulating int32, under the layer's own name."""
    acc = getattr(op, node.op_type)(*inputs, **attrs)
    _typed(acc, ir.DataType.INT32, y.shape, f"{y.name}_int32")
    return _name_producer(acc, node.name)


def _lower_layer(op, node: ir.Node, x, x_scale, x_zp, w_stored: ir.Value, w_scale, attrs: dict, y: ir.Value,
                 ascend: str, *, one_scale_per_tensor: bool = False) -> ir.Value:
    """Conv/Gemm with an optional DQ(int32) bias: AscendQuant -> the int8 layer -> AscendDequant;
    `one_scale_per_tensor`: per-tensor weights get one deq_scale even where the bias repeats it."""
    graph = node.graph
    bias = dequantized_bias(node)
    xq = _quant(op, x, x_scale, x_zp, graph.meta[OPTIONS])
    acc = _int8_layer(op, node, [xq, w_stored] + ([bias[0]] if bias else []), attrs, y)
    w_scale_np = const(w_scale).astype(np.float32).reshape(-1)
    deq = deq_scales(x_scale, w_scale_np, bias[1] if bias else None)
    if one_scale_per_tensor and deq.size > 1 and np.all(deq == deq[0]) and w_scale_np.size == 1:
        deq = deq[:1]  # per-tensor weights: the bias DQ repeats one scale
    return _close(op, graph, node, acc, deq, y, ascend, "int32" if bias else None)


def _activation_pattern(op, x, x_scale, x_zp, w_q, w_scale, w_zp):
    xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
    wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
    return xdq, wdq


class _LayerRule(RewriteRuleClassBase):
    """A rule rooted at a quantized layer `LAYER` (Conv, Gemm) reading DQ(Q(x)) and DQ(W int8),
    with its other inputs (a bias) and attributes left to the check."""

    LAYER = ""

    def __init__(self):
        super().__init__(remove_nodes=False)  # shared Q/DQ pairs die once unused

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp):
        xdq, wdq = _activation_pattern(op, x, x_scale, x_zp, w_q, w_scale, w_zp)
        return getattr(op, self.LAYER)(xdq, wdq, _allow_other_inputs=True, _allow_other_attributes=True,
                                       _outputs=["y"])


# -- Conv -----------------------------------------------------------------------------------------
class LowerConv(_LayerRule):
    """Conv(DQ(Q(x)), DQ(W int8) [, DQ(b int32)]) -> AscendDequant(Conv(AscendQuant(x), W [, b]))."""

    LAYER = "Conv"

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        checked = _layer_check(result, node, x, x_scale, x_zp, w_q, w_scale, w_zp)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        if w.ndim != 4:
            return _refuse(result, node, f"{w.ndim - 2}-D Conv: only 2-D Conv (NCHW) is lowered to "
                                         "Ascend's int8 convolution")
        axis = dq_axis(wdq, w.ndim)
        if axis not in (None, 0):
            return _refuse(result, node, f"Conv weight quantized along axis {axis}, not the output channels")
        return _bias_check(result, node, x_scale, s) or result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, y, **_):
        node = y.producer()
        return _lower_layer(op, node, x, x_scale, x_zp, w_q, w_scale, dict(node.attributes), y,
                            "AscendQuant -> Conv(int8) -> AscendDequant")


# -- Gemm -----------------------------------------------------------------------------------------
class LowerGemm(_LayerRule):
    """Gemm(DQ(Q(x)), DQ(W int8) [, DQ(c int32)]) -> AscendDequant(Gemm(AscendQuant(x), W' [, c])),
    with transB folded into the stored int8 weights."""

    LAYER = "Gemm"

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        if not is_quantized_layer(node):
            return result.fail("not a quantized layer")
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or attrs.get_int("transA", 0):
            return _refuse(result, node, "Gemm with alpha/beta != 1 or transA")
        checked = _layer_check(result, node, x, x_scale, x_zp, w_q, w_scale, w_zp)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        if w.ndim != 2:
            return _refuse(result, node, "Gemm weight is not 2-D")
        return _bias_check(result, node, x_scale, s) or result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, wdq, y, **_):
        node = y.producer()
        trans_b = node.attributes.get_int("transB", 0)
        w_stored = w_q
        if trans_b:  # fold transB into the stored weights: [N, K] -> [K, N]
            w_stored = initializer(op, node.graph, np.ascontiguousarray(const(w_q).T), f"{w_q.name}_transposed")
        attrs = {k: v for k, v in node.attributes.items() if k not in ("transB", "alpha", "beta", "transA")}
        return _lower_layer(op, node, x, x_scale, x_zp, w_stored, w_scale, attrs, y,
                            "AscendQuant -> Gemm(int8" + (", transB folded" if trans_b else "") + ") -> AscendDequant",
                            one_scale_per_tensor=True)


# -- MatMul (+ bias) ------------------------------------------------------------------------------
def _matmul_check(result, x, x_scale, x_zp, w_q, w_scale, w_zp, mm) -> MatchResult | tuple:
    node = mm.producer()
    if w_q.producer() is not None and w_q.producer().op_type == "QuantizeLinear" and is_quantized_layer(node):
        return _refuse(result, node, "MatMul of two activations (e.g. attention scores): ATC's quantized MatMul "
                                     "needs a constant 2-D int8 weight (AMCT adapts single-input MatMul only)")
    checked = _layer_check(result, node, x, x_scale, x_zp, w_q, w_scale, w_zp)
    if isinstance(checked, MatchResult):
        return checked
    w, s = checked
    if w.ndim != 2:
        return _refuse(result, node, f"MatMul weight is {w.ndim}-D; ATC's quantized MatMul takes a 2-D weight")
    out_rank = len(mm.shape) if mm.shape is not None else None
    if s.size > 1 and out_rank != 2:
        return _refuse(result, node, "per-channel MatMul weights with a rank-" + str(out_rank) + " output: "
                                     "AscendDequant's deq_scale runs along NCHW's C (axis 1), not the last axis; "
                                     "use per-tensor weights")
    return w, s


class LowerMatMulBias(RewriteRuleClassBase):
    """Add(MatMul(DQ(Q(x)), DQ(W)), b) -> AscendDequant(Add(MatMul(AscendQuant(x), W), int32 b)):
    the bias moves before the dequantization, at scale s_x·s_w (both orders of the Add: commute)."""

    def __init__(self):
        super().__init__(remove_nodes=False)

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp, b):
        xdq, wdq = _activation_pattern(op, x, x_scale, x_zp, w_q, w_scale, w_zp)
        return op.Add(op.MatMul(xdq, wdq, _outputs=["mm"]), b, _outputs=["y"])

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, mm, b, y, **_) -> MatchResult:
        result = MatchResult()
        bias = const(b)
        if bias is None:
            return result.fail("Add operand is not a constant bias")
        checked = _matmul_check(result, x, x_scale, x_zp, w_q, w_scale, w_zp, mm)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        n = w.shape[1]
        if bias.size not in (1, n) or (bias.ndim > 1 and int(np.prod(bias.shape[:-1])) != 1):
            return result.fail(f"Add operand of shape {list(bias.shape)} is not a per-output-channel bias")
        if len(mm.uses()) != 1:
            return result.fail("the MatMul output has other consumers than the bias Add")
        q, worst = int32_bias(bias, deq_scales(x_scale, s, None), n)
        if q is None:
            return _refuse(result, mm.producer(),
                           f"bias overflows int32 at scale s_x*s_w (|b/(s_x*s_w)| up to {worst:.3g}); kept float")
        return result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, mm, b, y, **_):
        node, add_node = mm.producer(), y.producer()
        graph = node.graph
        xq = _quant(op, x, x_scale, x_zp, graph.meta[OPTIONS])
        deq = deq_scales(x_scale, const(w_scale).astype(np.float32).reshape(-1), None)
        q, _ = int32_bias(const(b), deq, const(w_q).shape[1])
        acc = _int8_layer(op, node, [xq, w_q], {}, mm)
        acc_b = op.Add(acc, initializer(op, graph, q, f"{b.name}_int32"))
        _typed(acc_b, ir.DataType.INT32, y.shape, f"{y.name}_int32")
        _name_producer(acc_b, add_node.name or f"{node.name}_bias")
        out = _close(op, graph, node, acc_b, deq, y,
                     "AscendQuant -> MatMul(int8) -> Add(int32 bias) -> AscendDequant", "int32", output_tensor=y.name)
        acc.producer().meta[LOWERED] = acc_b.producer().meta.pop(LOWERED)   # the record belongs to the MatMul
        return out


class LowerMatMul(RewriteRuleClassBase):
    """MatMul(DQ(Q(x)), DQ(W int8)) -> AscendDequant(MatMul(AscendQuant(x), W))."""

    def __init__(self):
        super().__init__(remove_nodes=False)

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp):
        xdq, wdq = _activation_pattern(op, x, x_scale, x_zp, w_q, w_scale, w_zp)
        return op.MatMul(xdq, wdq, _outputs=["mm"])

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, mm, **_) -> MatchResult:
        result = MatchResult()
        checked = _matmul_check(result, x, x_scale, x_zp, w_q, w_scale, w_zp, mm)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        found = bias_add(mm, w.shape[1])
        if found is not None:  # its bias Add could not move before the dequantization: the layer stays float
            q, worst = int32_bias(found[1], deq_scales(x_scale, s, None), w.shape[1])
            if q is None:
                return _refuse(result, mm.producer(), f"bias overflows int32 at scale s_x*s_w (|b/(s_x*s_w)| up "
                                                      f"to {worst:.3g}); kept float")
        return result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, mm, **_):
        node = mm.producer()
        graph = node.graph
        xq = _quant(op, x, x_scale, x_zp, graph.meta[OPTIONS])
        acc = _int8_layer(op, node, [xq, w_q], {}, mm)
        deq = deq_scales(x_scale, const(w_scale).astype(np.float32).reshape(-1), None)
        return _close(op, graph, node, acc, deq, mm, "AscendQuant -> MatMul(int8) -> AscendDequant", None)


# -- weight-only ----------------------------------------------------------------------------------
class LowerWeightOnly(RewriteRuleClassBase):
    """DQ(W int8) feeding weight-only layers -> Mul(Cast(AscendAntiQuant(W, scale=1, offset=0)), s).

    AscendAntiQuant's scale/offset are scalar attributes; the int8 -> float16 conversion is exact,
    so the per-channel (or per-tensor) scale is applied by a float32 Mul: the weights keep the exact
    values the QDQ graph had, whatever the granularity."""

    def __init__(self):
        super().__init__(remove_nodes=False)

    def pattern(self, op, w_q, w_scale, w_zp):
        return op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["w"])

    def check(self, context, w_q, w_scale, w_zp, w, **_) -> MatchResult:
        result = MatchResult()
        uses = w.uses()
        layers = [u for u, i in uses if u.op_type in LAYER_OPS and i == 1]
        if not uses or len(layers) != len(uses) or not all(is_quantized_layer(u, weight_only=True) for u in layers):
            return result.fail("not the weight of weight-only layers")
        params = weight_params(w_q, w_scale, w_zp)
        if isinstance(params, str):
            return result.fail(params, failure_source=layers)
        return result

    def rewrite(self, op, w_q, w_scale, w, **_):
        wq = const(w_q)
        graph = w.producer().graph
        s = const(w_scale).astype(np.float32).reshape(-1)
        axis = dq_axis(w, wq.ndim)
        aq = op.AscendAntiQuant(w_q, scale=1.0, offset=0.0, sqrt_mode=0)
        _typed(aq, ir.DataType.FLOAT16, ir.Shape(wq.shape), f"{w_q.name}_fp16")
        _name_producer(aq, f"{w_q.name}_AscendAntiQuant")
        f = op.Cast(aq, to=ir.DataType.FLOAT)
        _typed(f, ir.DataType.FLOAT, ir.Shape(wq.shape), f"{w_q.name}_float")
        shape = [1] * wq.ndim
        if axis is not None:
            shape[axis] = s.size
        scale = initializer(op, graph, s.reshape(shape) if axis is not None else s.reshape(()),
                            f"{w_q.name}_antiquant_scale")
        out = op.Mul(f, scale)
        _typed(out, ir.DataType.FLOAT, ir.Shape(wq.shape))
        for user, _ in w.uses():
            user.meta[LOWERED] = {
                "ascend": "int8 weight -> AscendAntiQuant -> Cast -> Mul(scale) -> float " + user.op_type,
                "weight_scale": f"per_channel [{s.size}] (float32 Mul: AscendAntiQuant's scale is a scalar)"
                if axis is not None else "per_tensor (float32 Mul)"}
        return out


# Applied in order: Conv, Gemm and a MatMul with its bias Add first (so a MatMul is matched with
# its Add), then MatMuls without one, then the weight-only layers.
LOWERING_RULE_SETS = (
    RewriteRuleSet([LowerConv.rule(), LowerGemm.rule(), *LowerMatMulBias.rule().commute()]),
    RewriteRuleSet([LowerMatMul.rule()]),
    RewriteRuleSet([LowerWeightOnly.rule()]),
)


class Refusals(MatchingTracer):
    """Why each quantized layer a rule could not lower stays float: the first refusing check's
    reason, from a tracing run of the rule sets (tracing applies no rewrite)."""

    def __init__(self):
        super().__init__()
        self.reasons: dict[str, str] = {}

    def log(self, rule, container, node, match_result: MatchResult, status: MatchStatus) -> None:
        if status != MatchStatus.CONDITION_FAILED or not match_result.reason:
            return
        for source in match_result.failure_nodes_and_values:
            if isinstance(source, ir.Node) and source.name:
                self.reasons.setdefault(source.name, match_result.reason)

    @classmethod
    def of(cls, model: ir.Model) -> dict[str, str]:
        tracer = cls()
        for rules in LOWERING_RULE_SETS:
            rules.apply_to_model(model, tracer=tracer)
        return tracer.reasons
