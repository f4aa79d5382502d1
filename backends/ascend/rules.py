"""QDQ -> Ascend rewrite rules (onnxscript patterns), and the decompositions the opset
down-conversion needs.

A quantized layer in the QDQ mid-level form

    DequantizeLinear(QuantizeLinear(x)) ─┐
    int8 W ─> DequantizeLinear ──────────┼─> Conv | Gemm | MatMul [-> Add(bias)] ─> y
    int32 b ─> DequantizeLinear ─────────┘

becomes what ATC fuses into its int8 cube kernels

    x ─> AscendQuant(scale=1/s_x, offset=zp_x) ─> Conv | Gemm | MatMul (int8 W, int32 b) [-> Add(int32 b)]
      ─> AscendDequant(deq_scale = uint64(float32 bits of s_x·s_w)) ─> y

Weight-only layers keep a float activation: int8 W ─> AscendAntiQuant ─> Cast ─> Mul(scale).

The rules share a `LoweringState`: one AscendQuant per quantized tensor (a cache), the
layers lowered, and why a quantized layer could not be (it then stays float).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleClassBase
from onnxscript.rewriter._basics import MatchResult

from . import formulas

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class LoweringState:
    layers: object                        # the compile's LayerTable: which layers the quantize pass quantized
    round_mode: str = "Round"
    compute_dtype: str = "float16"        # AscendQuant arithmetic (descriptor: quant_compute_dtype)
    lowered: dict[str, dict] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    quant_cache: dict[tuple, ir.Value] = dataclasses.field(default_factory=dict)
    reserved: set[str] = dataclasses.field(default_factory=set)  # initializer names handed out
    graph: ir.Graph | None = None

    def refuse(self, layer: str, reason: str) -> None:
        self.refused.setdefault(layer, reason)


# -- helpers --------------------------------------------------------------------------------------
def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def is_quantized_layer(state: LoweringState, node: ir.Node, *, weight_only: bool = False) -> bool:
    """A layer the quantize pass quantized (W8A8, or weight-only) and no rule has refused."""
    record = state.layers.get(node.name or "")
    if record is None or not record.is_quantized or (node.name or "") in state.refused:
        return False
    return record.weight_only == weight_only


def unique_init_name(graph: ir.Graph, base: str, reserved: set[str]) -> str:
    """A fresh initializer name (the rewriter registers new initializers after the rewrite)."""
    name, i = base, 0
    while name in graph.initializers or name in reserved:
        i += 1
        name = f"{base}_{i}"
    reserved.add(name)
    return name


def _initializer(op, state: LoweringState, array: np.ndarray, base: str) -> ir.Value:
    name = unique_init_name(state.graph, base, state.reserved)
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


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


def _check_activation_qdq(x: ir.Value, x_scale: ir.Value, x_zp: ir.Value) -> str | None:
    s, z = const(x_scale), const(x_zp)
    if s is None or z is None or s.size != 1 or z.size != 1:
        return "activation scale/zero point are not constant scalars (AscendQuant takes scalar attributes)"
    if x_zp.dtype != ir.DataType.INT8:
        return f"activation quantized to {x_zp.dtype}, AscendQuant outputs int8"
    if not (np.isfinite(s).all() and float(s.reshape(())) > 0):
        return "activation scale is not positive"
    if x.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"activation of type {x.dtype} (AscendQuant takes float32/float16)"
    return None


def _weight_params(w_q: ir.Value, w_scale: ir.Value, w_zp: ir.Value | None) -> tuple[np.ndarray, np.ndarray] | str:
    w, s = const(w_q), const(w_scale)
    if w is None or s is None:
        return "weight is not a constant int8 initializer"
    if w_q.dtype != ir.DataType.INT8:
        return f"weight stored as {w_q.dtype}, Ascend's int8 kernels take int8 weights"
    z = const(w_zp) if w_zp is not None else np.zeros(1, np.int8)
    if z is None or np.any(z != 0):
        return "weight zero point is not 0 (Ascend's int8 kernels take symmetric weights)"
    return w, s.astype(np.float32).reshape(-1)


def _dq_axis(dq_out: ir.Value, ndim: int) -> int | None:
    node = dq_out.producer()
    scale = const(node.inputs[1])
    if scale is None or scale.size == 1:
        return None
    axis = node.attributes.get_int("axis", 1)
    return axis % ndim


def _deq(x_scale: ir.Value, w_scale: np.ndarray, bias_scale: ir.Value | None) -> np.ndarray:
    """float32 s_x·s_w per output channel (the bias DQ scale when there is one: what quantize used)."""
    if bias_scale is not None and const(bias_scale) is not None:
        return const(bias_scale).astype(np.float32).reshape(-1)
    return (np.float32(const(x_scale).reshape(())) * w_scale.astype(np.float32)).astype(np.float32).reshape(-1)


def _deq_matches_bias(x_scale, w_scale, b_scale) -> bool:
    expected = (np.float32(const(x_scale).reshape(())) * w_scale.astype(np.float32)).reshape(-1)
    got = const(b_scale)
    if got is None:
        return False
    got = got.astype(np.float32).reshape(-1)
    if expected.size == 1 and got.size > 1:
        expected = np.full(got.shape, expected[0], np.float32)
    return got.shape == expected.shape and np.allclose(got, expected, rtol=1e-6, atol=0)


class _AscendRule(RewriteRuleClassBase):
    """Base: keeps matched nodes (shared Q/DQ pairs die once unused), shares the state."""

    def __init__(self, state: LoweringState, name: str | None = None):
        super().__init__(name=name or type(self).__name__, remove_nodes=False)
        self.state = state

    def _fail(self, result: MatchResult, layer: str | None, reason: str) -> MatchResult:
        if layer:
            self.state.refuse(layer, reason)
        return result.fail(reason)

    def quant(self, op, x: ir.Value, x_scale: ir.Value, x_zp: ir.Value) -> ir.Value:
        """One AscendQuant per quantized tensor, shared by all its consumers."""
        attrs = formulas.quant_attributes(float(const(x_scale).reshape(())), int(const(x_zp).reshape(())),
                                          round_mode=self.state.round_mode,
                                          compute_dtype=self.state.compute_dtype)
        key = (id(x), tuple(sorted(attrs.items())))
        cached = self.state.quant_cache.get(key)
        if cached is not None and cached.producer() is not None and cached.producer().graph is not None:
            return cached
        q = op.AscendQuant(x, **attrs)
        _typed(q, ir.DataType.INT8, x.shape, f"{x.name}_ascend_int8")
        _name_producer(q, f"{x.name}_AscendQuant")
        self.state.quant_cache[key] = q
        return q

    def layer_check(self, result: MatchResult, node: ir.Node, x, x_scale, x_zp, w_q, w_scale, w_zp
                    ) -> MatchResult | tuple[np.ndarray, np.ndarray]:
        """What every lowered layer needs: a quantized layer, a lowerable activation Q/DQ and
        int8 weights. Returns (weights, weight scales) or the failed match."""
        if not is_quantized_layer(self.state, node):
            return result.fail("not a quantized layer")
        problem = _check_activation_qdq(x, x_scale, x_zp)
        if problem:
            return self._fail(result, node.name, problem)
        params = _weight_params(w_q, w_scale, w_zp)
        return self._fail(result, node.name, params) if isinstance(params, str) else params

    def bias_check(self, result: MatchResult, node: ir.Node, x_scale, s: np.ndarray, b_q, b_scale, b_zp
                   ) -> MatchResult | None:
        """A DequantizeLinear bias must be int32, zero point 0, at scale s_x·s_w (else the failed match)."""
        if const(b_q) is None or b_q.dtype != ir.DataType.INT32 or np.any(const(b_zp) != 0):
            return self._fail(result, node.name, "bias is not a constant int32 with zero point 0")
        if not _deq_matches_bias(x_scale, s, b_scale):
            return self._fail(result, node.name, "bias scale is not s_x*s_w")
        return None

    def lowered(self, op, node: ir.Node, acc: ir.Value, deq: np.ndarray, like: ir.Value, ascend: str,
                bias: str | None) -> ir.Value:
        """Record the layer's lowering in the report and close it with AscendDequant."""
        self.state.lowered[node.name] = {"ascend": ascend,
                                         "deq_scale": f"per_channel [{deq.size}]" if deq.size > 1 else "per_tensor",
                                         "bias": bias}
        return self.dequant(op, acc, deq, node.name, like)

    def dequant(self, op, acc: ir.Value, deq: np.ndarray, layer: str, like: ir.Value) -> ir.Value:
        packed = formulas.pack_deq_scale(deq)
        deq_v = _initializer(op, self.state, packed, f"{layer}_deq_scale")
        out = op.AscendDequant(acc, deq_v, dtype=0, sqrt_mode=0, relu_flag=0)
        _typed(out, ir.DataType.FLOAT, like.shape)
        return _name_producer(out, f"{layer}_AscendDequant")


# -- Conv -----------------------------------------------------------------------------------------
class LowerConv(_AscendRule):
    """Conv(DQ(Q(x)), DQ(W int8), [DQ(b int32)]) -> AscendDequant(Conv(AscendQuant(x), W, b))."""

    with_bias = False

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp):
        xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
        wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
        return op.Conv(xdq, wdq, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, y, b_q=None, b_scale=None, b_zp=None,
              **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        self.state.graph = context.graph_or_function
        checked = self.layer_check(result, node, x, x_scale, x_zp, w_q, w_scale, w_zp)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        if w.ndim != 4:
            return self._fail(result, node.name, f"{w.ndim - 2}-D Conv: only 2-D Conv (NCHW) is lowered to "
                                                 "Ascend's int8 convolution")
        axis = _dq_axis(wdq, w.ndim)
        if axis not in (None, 0):
            return self._fail(result, node.name, f"Conv weight quantized along axis {axis}, not the output channels")
        if self.with_bias:
            return self.bias_check(result, node, x_scale, s, b_q, b_scale, b_zp) or result
        return result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, y, b_q=None, b_scale=None, **_):
        node = y.producer()
        xq = self.quant(op, x, x_scale, x_zp)
        inputs = [xq, w_q] + ([b_q] if self.with_bias else [])
        acc = op.Conv(*inputs, **dict(node.attributes))
        _typed(acc, ir.DataType.INT32, y.shape, f"{y.name}_int32")
        _name_producer(acc, node.name)
        w_scale_np = const(w_scale).astype(np.float32).reshape(-1)
        deq = _deq(x_scale, w_scale_np, b_scale if self.with_bias else None)
        return self.lowered(op, node, acc, deq, y, "AscendQuant -> Conv(int8) -> AscendDequant",
                            "int32" if self.with_bias else None)


class LowerConvBias(LowerConv):
    with_bias = True

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp, b_q, b_scale, b_zp):
        xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
        wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
        bdq = op.DequantizeLinear(b_q, b_scale, b_zp, _allow_other_attributes=True)
        return op.Conv(xdq, wdq, bdq, _allow_other_attributes=True, _outputs=["y"])


# -- Gemm -----------------------------------------------------------------------------------------
class LowerGemm(_AscendRule):
    """Gemm(DQ(Q(x)), DQ(W int8), [DQ(c int32)]) -> AscendDequant(Gemm(AscendQuant(x), W', c)),
    with transB folded into the stored int8 weights."""

    with_bias = False

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp):
        xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
        wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
        return op.Gemm(xdq, wdq, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, y, b_q=None, b_scale=None, b_zp=None,
              **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        self.state.graph = context.graph_or_function
        if not is_quantized_layer(self.state, node):
            return result.fail("not a quantized layer")
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or attrs.get_int("transA", 0):
            return self._fail(result, node.name, "Gemm with alpha/beta != 1 or transA")
        checked = self.layer_check(result, node, x, x_scale, x_zp, w_q, w_scale, w_zp)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        if w.ndim != 2:
            return self._fail(result, node.name, "Gemm weight is not 2-D")
        if self.with_bias:
            return self.bias_check(result, node, x_scale, s, b_q, b_scale, b_zp) or result
        return result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, wdq, y, b_q=None, b_scale=None, **_):
        node = y.producer()
        xq = self.quant(op, x, x_scale, x_zp)
        trans_b = node.attributes.get_int("transB", 0)
        w_stored = w_q
        if trans_b:  # fold transB into the stored weights: [N, K] -> [K, N]
            w_stored = _initializer(op, self.state, np.ascontiguousarray(const(w_q).T), f"{w_q.name}_transposed")
        attrs = {k: v for k, v in node.attributes.items() if k not in ("transB", "alpha", "beta", "transA")}
        inputs = [xq, w_stored] + ([b_q] if self.with_bias else [])
        acc = op.Gemm(*inputs, **attrs)
        _typed(acc, ir.DataType.INT32, y.shape, f"{y.name}_int32")
        _name_producer(acc, node.name)
        w_scale_np = const(w_scale).astype(np.float32).reshape(-1)
        deq = _deq(x_scale, w_scale_np, b_scale if self.with_bias else None)
        if deq.size > 1 and np.all(deq == deq[0]) and w_scale_np.size == 1:
            deq = deq[:1]  # per-tensor weights: the bias DQ repeats one scale
        return self.lowered(op, node, acc, deq, y,
                            "AscendQuant -> Gemm(int8" + (", transB folded" if trans_b else "") + ") -> AscendDequant",
                            "int32" if self.with_bias else None)


class LowerGemmBias(LowerGemm):
    with_bias = True

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp, b_q, b_scale, b_zp):
        xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
        wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
        bdq = op.DequantizeLinear(b_q, b_scale, b_zp, _allow_other_attributes=True)
        return op.Gemm(xdq, wdq, bdq, _allow_other_attributes=True, _outputs=["y"])


# -- MatMul (+ bias) ------------------------------------------------------------------------------
def _matmul_check(rule: _AscendRule, result, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, mm) -> MatchResult | tuple:
    node = mm.producer()
    if w_q.producer() is not None and w_q.producer().op_type == "QuantizeLinear" \
            and is_quantized_layer(rule.state, node):
        return rule._fail(result, node.name,
                          "MatMul of two activations (e.g. attention scores): ATC's quantized MatMul needs a "
                          "constant 2-D int8 weight (AMCT adapts single-input MatMul only)")
    checked = rule.layer_check(result, node, x, x_scale, x_zp, w_q, w_scale, w_zp)
    if isinstance(checked, MatchResult):
        return checked
    w, s = checked
    if w.ndim != 2:
        return rule._fail(result, node.name, f"MatMul weight is {w.ndim}-D; ATC's quantized MatMul takes a 2-D weight")
    out_rank = len(mm.shape) if mm.shape is not None else None
    if s.size > 1 and out_rank != 2:
        return rule._fail(result, node.name,
                          "per-channel MatMul weights with a rank-" + str(out_rank) + " output: AscendDequant's "
                          "deq_scale runs along NCHW's C (axis 1), not the last axis; use per-tensor weights")
    return w, s


class LowerMatMul(_AscendRule):
    """MatMul(DQ(Q(x)), DQ(W int8)) -> AscendDequant(MatMul(AscendQuant(x), W))."""

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp):
        xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
        wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
        return op.MatMul(xdq, wdq, _outputs=["mm"])

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, mm, **_) -> MatchResult:
        result = MatchResult()
        self.state.graph = context.graph_or_function
        checked = _matmul_check(self, result, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, mm)
        return checked if isinstance(checked, MatchResult) else result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, mm, **_):
        node = mm.producer()
        xq = self.quant(op, x, x_scale, x_zp)
        acc = op.MatMul(xq, w_q)
        _typed(acc, ir.DataType.INT32, mm.shape, f"{mm.name}_int32")
        _name_producer(acc, node.name)
        deq = _deq(x_scale, const(w_scale).astype(np.float32).reshape(-1), None)
        return self.lowered(op, node, acc, deq, mm, "AscendQuant -> MatMul(int8) -> AscendDequant", None)


class LowerMatMulBias(_AscendRule):
    """Add(MatMul(DQ(Q(x)), DQ(W)), b) -> AscendDequant(Add(MatMul(AscendQuant(x), W), int32 b)):
    the bias moves before the dequantization, at scale s_x·s_w."""

    def __init__(self, state: LoweringState, bias_first: bool):
        super().__init__(state, name=f"LowerMatMulBias{'First' if bias_first else ''}")
        self.bias_first = bias_first

    def pattern(self, op, x, x_scale, x_zp, w_q, w_scale, w_zp, b):
        xdq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)
        wdq = op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["wdq"])
        mm = op.MatMul(xdq, wdq, _outputs=["mm"])
        return op.Add(b, mm, _outputs=["y"]) if self.bias_first else op.Add(mm, b, _outputs=["y"])

    def check(self, context, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, mm, b, y, **_) -> MatchResult:
        result = MatchResult()
        self.state.graph = context.graph_or_function
        bias = const(b)
        if bias is None:
            return result.fail("Add operand is not a constant bias")
        checked = _matmul_check(self, result, x, x_scale, x_zp, w_q, w_scale, w_zp, wdq, mm)
        if isinstance(checked, MatchResult):
            return checked
        w, s = checked
        n = w.shape[1]
        if bias.size not in (1, n) or (bias.ndim > 1 and int(np.prod(bias.shape[:-1])) != 1):
            return result.fail(f"Add operand of shape {list(bias.shape)} is not a per-output-channel bias")
        if len(mm.uses()) != 1:
            return result.fail("the MatMul output has other consumers than the bias Add")
        deq = _deq(x_scale, s, None)
        q, worst = formulas.bias_to_int32(np.broadcast_to(bias.reshape(-1), (n,)), deq)
        if q is None:
            return self._fail(result, mm.producer().name,
                              f"bias overflows int32 at scale s_x*s_w (|b/(s_x*s_w)| up to {worst:.3g}); kept float")
        return result

    def rewrite(self, op, x, x_scale, x_zp, w_q, w_scale, mm, b, y, **_):
        node = mm.producer()
        add_node = y.producer()
        xq = self.quant(op, x, x_scale, x_zp)
        w_scale_np = const(w_scale).astype(np.float32).reshape(-1)
        deq = _deq(x_scale, w_scale_np, None)
        n = const(w_q).shape[1]
        q, _ = formulas.bias_to_int32(np.broadcast_to(const(b).reshape(-1), (n,)), deq)
        acc = op.MatMul(xq, w_q)
        _typed(acc, ir.DataType.INT32, mm.shape, f"{mm.name}_int32")
        _name_producer(acc, node.name)
        b32 = _initializer(op, self.state, q, f"{b.name}_int32")
        acc_b = op.Add(acc, b32)
        _typed(acc_b, ir.DataType.INT32, y.shape, f"{y.name}_int32")
        _name_producer(acc_b, add_node.name or f"{node.name}_bias")
        out = self.lowered(op, node, acc_b, deq, y, "AscendQuant -> MatMul(int8) -> Add(int32 bias) -> AscendDequant",
                           "int32")
        self.state.lowered[node.name]["output_tensor"] = y.name
        return out


# -- weight-only ----------------------------------------------------------------------------------
class LowerWeightOnly(_AscendRule):
    """DQ(W int8) feeding weight-only layers -> Mul(Cast(AscendAntiQuant(W, scale=1, offset=-zp)), s).

    AscendAntiQuant's scale/offset are scalar attributes; the int8 -> float16 conversion is exact,
    so the per-channel (or per-tensor) scale is applied by a float32 Mul: the weights keep the exact
    values the QDQ graph had, whatever the granularity."""

    def pattern(self, op, w_q, w_scale, w_zp):
        return op.DequantizeLinear(w_q, w_scale, w_zp, _allow_other_attributes=True, _outputs=["w"])

    def check(self, context, w_q, w_scale, w_zp, w, **_) -> MatchResult:
        result = MatchResult()
        self.state.graph = context.graph_or_function
        uses = w.uses()
        layers = [u for u, i in uses if u.op_type in LAYER_OPS and i == 1]
        if not uses or len(layers) != len(uses) or not all(is_quantized_layer(self.state, u, weight_only=True)
                                                           for u in layers):
            return result.fail("not the weight of weight-only layers")
        params = _weight_params(w_q, w_scale, w_zp)
        if isinstance(params, str):
            for u in layers:
                self.state.refuse(u.name, params)
            return result.fail(params)
        return result

    def rewrite(self, op, w_q, w_scale, w, **_):
        wq = const(w_q)
        s = const(w_scale).astype(np.float32).reshape(-1)
        axis = _dq_axis(w, wq.ndim)
        aq = op.AscendAntiQuant(w_q, scale=1.0, offset=0.0, sqrt_mode=0)
        _typed(aq, ir.DataType.FLOAT16, ir.Shape(wq.shape), f"{w_q.name}_fp16")
        _name_producer(aq, f"{w_q.name}_AscendAntiQuant")
        f = op.Cast(aq, to=ir.DataType.FLOAT)
        _typed(f, ir.DataType.FLOAT, ir.Shape(wq.shape), f"{w_q.name}_float")
        shape = [1] * wq.ndim
        if axis is not None:
            shape[axis] = s.size
        scale = _initializer(op, self.state, s.reshape(shape) if axis is not None else s.reshape(()),
                             f"{w_q.name}_antiquant_scale")
        out = op.Mul(f, scale)
        _typed(out, ir.DataType.FLOAT, ir.Shape(wq.shape))
        for user, _ in w.uses():
            self.state.lowered[user.name] = {
                "ascend": "int8 weight -> AscendAntiQuant -> Cast -> Mul(scale) -> float " + user.op_type,
                "weight_scale": f"per_channel [{s.size}] (float32 Mul: AscendAntiQuant's scale is a scalar)"
                if axis is not None else "per_tensor (float32 Mul)"}
        return out


def lowering_rule_sets(state: LoweringState) -> list[list]:
    """Applied in order: layers with a bias first (so a MatMul is matched with its Add), then
    the rest, then the weight-only layers."""
    return [
        [LowerConvBias.rule(state), LowerGemmBias.rule(state),
         LowerMatMulBias.rule(state, False), LowerMatMulBias.rule(state, True)],
        [LowerConv.rule(state), LowerGemm.rule(state), LowerMatMul.rule(state)],
        [LowerWeightOnly.rule(state)],
    ]


# -- decompositions for opset down-conversion ------------------------------------------------------
class _DecomposeBase(RewriteRuleClassBase):
    def __init__(self, graph_holder: dict[str, Any]):
        super().__init__(name=type(self).__name__, remove_nodes=True)
        self.holder = graph_holder

    def _const(self, op, value: float, base: str) -> ir.Value:
        name = unique_init_name(self.holder["graph"], base, self.holder.setdefault("reserved", set()))
        return op.initializer(ir.tensor(np.asarray(value, dtype=np.float32), name=name), name=name)


class DecomposeLayerNorm(_DecomposeBase):
    """LayerNormalization (opset 17) -> ReduceMean/Sub/Mul/Add/Sqrt/Div (opset 13..17 forms)."""

    def pattern(self, op, x, scale):
        return op.LayerNormalization(x, scale, _allow_other_inputs=True, _allow_other_attributes=True,
                                     _outputs=["y"])

    def check(self, context, x, scale, y, **_) -> MatchResult:
        result = MatchResult()
        self.holder["graph"] = context.graph_or_function
        node = y.producer()
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail("Mean/InvStdDev outputs are used")
        if x.shape is None:
            return result.fail("input rank unknown")
        if x.dtype not in (None, ir.DataType.FLOAT):
            return result.fail("only float32 LayerNormalization is decomposed")
        return result

    def rewrite(self, op, x, scale, y, **_):
        node = y.producer()
        rank = len(x.shape)
        axis = node.attributes.get_int("axis", -1) % rank
        eps = node.attributes.get_float("epsilon", 1e-5)
        axes = list(range(axis, rank))
        base = node.name or "LayerNormalization"
        mean = op.ReduceMean(x, axes=axes, keepdims=1)
        d = op.Sub(x, mean)
        var = op.ReduceMean(op.Mul(d, d), axes=axes, keepdims=1)
        std = op.Sqrt(op.Add(var, self._const(op, eps, f"{base}_epsilon")))
        out = op.Mul(op.Div(d, std), scale)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            out = op.Add(out, bias)
        return out


class DecomposeGelu(_DecomposeBase):
    """Gelu (opset 20) -> Erf form (approximate='none') or Tanh form (approximate='tanh')."""

    def pattern(self, op, x):
        return op.Gelu(x, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, y, **_) -> MatchResult:
        self.holder["graph"] = context.graph_or_function
        return MatchResult()

    def rewrite(self, op, x, y, **_):
        node = y.producer()
        base = node.name or "Gelu"
        approx = node.attributes.get_string("approximate", "none")
        half = self._const(op, 0.5, f"{base}_half")
        one = self._const(op, 1.0, f"{base}_one")
        if approx == "tanh":
            c = self._const(op, math.sqrt(2.0 / math.pi), f"{base}_sqrt_2_over_pi")
            k = self._const(op, 0.044715, f"{base}_k")
            inner = op.Mul(c, op.Add(x, op.Mul(k, op.Mul(x, op.Mul(x, x)))))
            t = op.Tanh(inner)
        else:
            t = op.Erf(op.Div(x, self._const(op, math.sqrt(2.0), f"{base}_sqrt2")))
        return op.Mul(op.Mul(half, x), op.Add(one, t))


# op -> the opset it was born in; decomposed when converting below that opset
DECOMPOSED_OPS = {"LayerNormalization": 17, "Gelu": 20}


def decomposition_rules(holder: dict[str, Any], below_opset: int) -> list:
    """Rules decomposing the ops of DECOMPOSED_OPS that do not exist at `below_opset`."""
    rules = {"LayerNormalization": DecomposeLayerNorm, "Gelu": DecomposeGelu}
    return [rules[op].rule(holder) for op, born in DECOMPOSED_OPS.items() if born > below_opset]
