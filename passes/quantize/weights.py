"""Weights: the granularity a layer's weights get, their integers (round-to-nearest or a weight
algorithm's choice handed over in `PrecomputedWeights`), their storage as an integer initializer
+ DequantizeLinear, and the int32 bias at s_x·s_w."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import onnx_ir as ir

from qcompile.analyses import PrecomputedWeight
from qcompile.numerics import (INT_TYPES, bits, block_minmax, compute_qparams, full_range_qparams, is_float8,
                               qrange, quantize, reduce_absmax, to_storage)
from qcompile.qdq import store_weight_quantized
from qcompile.schemes import WeightScheme

from .plan import LayerPlan, const, weight_granularity


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    value: ir.Value | None     # the DequantizeLinear output the layer reads (None: dynamic, raw integers)
    scale: np.ndarray
    q: np.ndarray              # the integers, in the layer's layout ([K, N] for dynamic Gemm)
    nbytes: int


def layer_granularity(node: ir.Node, plan: LayerPlan, weight: WeightScheme, target) -> tuple[str, int | None]:
    """(granularity used, block axis for per_group): the target's, per-channel for dynamic
    activations, per-channel for a Conv with fewer input channels per group than group_size."""
    granularity = weight_granularity(weight, target, node.op_type)
    if plan.dynamic and granularity == "per_group":
        granularity = "per_channel"
    if granularity != "per_group":
        return granularity, None
    if node.op_type == "Conv":  # groups along the input channels, per output channel and tap
        w = node.inputs[plan.weight_index].const_value
        return ("per_group", 1) if w.shape[1] >= weight.group_size else ("per_channel", None)
    if node.op_type == "Gemm":
        return "per_group", (1 if node.attributes.get_int("transB", 0) else 0)
    return "per_group", const(node.inputs[plan.weight_index]).ndim - 2  # MatMul: the K axis


def u8s8_safe(weight: WeightScheme, node: ir.Node, plan: LayerPlan, act_dtype: str | None, target) -> WeightScheme:
    """The weight scheme with 7-bit ranges where the target's U8S8 kernels for this op saturate
    (its `u8s8_saturating_ops`: onnxruntime on AVX2 without VNNI) and the layer multiplies uint8
    activations (static uint8, or dynamic: both dynamic forms feed the kernel uint8)."""
    ops = (target.setting("u8s8_saturating_ops") or ()) if target is not None else ()
    uint8_input = plan.dynamic or act_dtype == "uint8"
    if node.op_type in ops and uint8_input and weight.dtype == "int8" and not weight.reduce_range:
        return dataclasses.replace(weight, reduce_range=True)
    return weight


def why_granularity(node: ir.Node, granularity: str) -> str:
    if granularity == "per_tensor":
        return "the target takes this op's weights per tensor"
    if node.op_type == "Conv":
        return "the Conv has fewer input channels per group than group_size (depthwise: 1)"
    return "dynamic activations need per-channel weights"


def quantize_weight(graph: ir.Graph, w_val: ir.Value, plan: LayerPlan, scheme: WeightScheme, granularity: str,
                    block_axis: int | None, chosen: PrecomputedWeight | None, warn) -> QuantizedWeight:
    """The weight's integers and scales (a weight algorithm's, when it chose them for this
    scheme, else rounded here), stored as integer initializer + DequantizeLinear."""
    w = w_val.const_value.numpy().astype(np.float32)
    axis = plan.axis if granularity == "per_channel" else None
    block = None
    if granularity == "per_group":
        axis, block = block_axis, scheme.group_size
    taken = _take_precomputed(chosen, w_val, plan, scheme, granularity, axis, block, warn)
    q, scale, zp = taken if taken is not None else round_weight(w, w_val.name, scheme, axis, block)
    nbytes = (q.size * bits(scheme.dtype) + 7) // 8 + scale.size * 4 + \
        (0 if scheme.symmetric else (zp.size * bits(scheme.dtype) + 7) // 8)
    if plan.dynamic:  # integer ops take the raw int8 weight, laid out for MatMulInteger ([K, N])
        if plan.node.op_type == "Gemm" and plan.node.attributes.get_int("transB", 0):
            q = np.ascontiguousarray(q.T)
        return QuantizedWeight(None, scale, q, nbytes)
    out = store_weight_quantized(graph, w_val, to_storage(q, scheme.dtype), scale,
                                 to_storage(np.asarray(zp), scheme.dtype), axis, block)
    return QuantizedWeight(out, scale, q, nbytes)


def _take_precomputed(pre: PrecomputedWeight | None, w_val, plan: LayerPlan, scheme, granularity, axis, block, warn):
    """A weight algorithm's integers and scales in this pass's layout, when made for the same
    scheme; None otherwise (with a warning if they differ)."""
    if pre is None:
        return None
    if pre.scheme != scheme or pre.granularity != granularity or plan.dynamic:
        warn(f"{plan.node.name}: the weight algorithm quantized {w_val.name} as {pre.scheme.label()}, "
             f"but quantize asks for {scheme.label()}; rounding it again")
        return None
    transposed = plan.node.op_type == "Gemm" and plan.node.attributes.get_int("transB", 0)
    q, scale = pre.q, pre.scale
    if transposed:  # gptq works on [K, N]; this weight is [N, K]
        q = np.ascontiguousarray(q.T)
        scale = np.ascontiguousarray(scale.T) if block else scale
    if (axis is None) != (pre.axis is None) or q.shape != tuple(w_val.const_value.shape):
        return None
    return q, scale, np.zeros(scale.shape, dtype=q.dtype)


def round_weight(w: np.ndarray, name: str, scheme: WeightScheme, axis, block):
    """Round-to-nearest (or the scheme's rounding mode) with min/max scales."""
    if block:
        lo, hi = block_minmax(w, axis, block)
    else:
        lo, hi = reduce_absmax(w, axis)
    if scheme.full_range:
        scale, zp = full_range_qparams(lo, hi, scheme.dtype)
    else:
        scale, zp = compute_qparams(lo, hi, scheme.dtype, symmetric=scheme.symmetric, restricted=True,
                                    reduce_range=scheme.reduce_range)
    rng = np.random.default_rng([scheme.seed, zlib.crc32(name.encode())]) \
        if scheme.rounding == "stochastic" else None
    q = quantize(w, scale, zp, scheme.dtype, axis=axis, block_size=block, rounding=scheme.rounding, rng=rng)
    if scheme.symmetric and not scheme.full_range and not is_float8(scheme.dtype):
        qmin, qmax = qrange(scheme.dtype, restricted=True, reduce_range=scheme.reduce_range)
        q = np.clip(q, qmin, qmax).astype(q.dtype)  # floor/ceil/stochastic can step past -qmax
    return q, scale, zp


def takes_int32_bias(plan: LayerPlan, act_dtype: str | None, granularity: str, target=None) -> bool:
    """A static int8/uint8 layer with per-tensor/per-channel integer weights: its bias goes int32,
    unless the target keeps biases float (its descriptor's `int32_bias: false`: TensorRT)."""
    return plan.static and bool(plan.activations) and act_dtype in ("int8", "uint8") \
        and granularity != "per_group" and not is_float8(plan.scheme.weight.dtype) \
        and (target is None or target.setting("int32_bias", True))


def quantize_bias(graph: ir.Graph, node: ir.Node, bias: ir.Value, x_scale: np.ndarray,
                  w_scale: np.ndarray) -> str | None:
    """The bias as int32 at s_x·s_w + DequantizeLinear (what onnxruntime needs to fuse an int8
    kernel); a note when it stays float."""
    b = const(bias)
    if b is None:
        return "bias is not constant; kept float"
    if b.ndim > 1 and int(np.prod(b.shape[:-1])) != 1:
        return f"bias of shape {list(b.shape)} is not a per-channel vector; kept float"
    b = b.reshape(-1)
    scale = (np.float32(x_scale) * w_scale.astype(np.float32)).reshape(-1)
    if scale.size == 1:
        scale = np.full(b.shape[-1], scale[0], dtype=np.float32)
    q = np.rint(b.astype(np.float64) / scale.astype(np.float64))
    lo, hi = INT_TYPES["int32"][:2]
    if q.min() < lo or q.max() > hi:
        return "bias overflows int32 at scale s_x*s_w; kept float"
    out = store_weight_quantized(graph, bias, q.astype(np.int32), scale, np.zeros_like(q, dtype=np.int32), 0)
    node.replace_input_with(2, out)
    return None


def initializer_bytes(graph: ir.Graph) -> int:
    return int(sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None))
