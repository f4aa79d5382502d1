"""FA3 int8 attention: `quantize_attention`'s Q/K/V quantization around MultiHeadAttention, as one op.

passes/quantize_attention.py gives a fused attention's query, key and value inputs one
symmetric int8 scale per head (FlashAttention-3's numerics) with standard ops: each input is
viewed per head (Reshape), quantized and dequantized on the head axis, and viewed back, so
onnxruntime's MultiHeadAttention computes on the dequantized floats — FA3's numerics at more
than float attention's cost. This module finds that form and replaces it with one
`com.qcompile.QAttentionInt8` node, which quantizes Q, K and V itself and runs both products
on the int8 values (backends/cpu/kernels/QAttentionInt8.cpp.j2).

Forms recognised per input (the two `quantize_attention` writes for a [batch, seq, heads *
head_dim] input):
  per_head:   Reshape([0, 0, H, -1]) -> QuantizeLinear(axis 2) -> DequantizeLinear(axis 2) -> Reshape([0, 0, -1])
  per_tensor: QuantizeLinear -> DequantizeLinear with one scale
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.kernelgen import DOMAIN, KernelSpec
from qcompile.qdq import take_over

from .kernel_match import const, const_equal, plain_attention, producer, softmax_scale, zero_int8_point

OP = "QAttentionInt8"


@dataclasses.dataclass
class Int8Input:
    source: ir.Value          # the float tensor [B, S, H*D] before quantization
    scale: ir.Value           # constant float [H] or one value


@dataclasses.dataclass
class Int8Attention:
    layer: str                # the MultiHeadAttention node's name (the FA3 layer record's)
    attention: ir.Node
    query: Int8Input
    key: Int8Input
    value: Int8Input
    bias: ir.Value | None
    heads: int
    head_dim: int
    softmax_scale: float
    layout: str               # per_head | per_tensor


def _qdq(value: ir.Value, axis: int | None) -> tuple[ir.Value, ir.Value] | None:
    """(source, scale) of DequantizeLinear(QuantizeLinear(source)) with one symmetric int8 codec."""
    dq = producer(value, "DequantizeLinear")
    q = producer(dq.inputs[0], "QuantizeLinear") if dq else None
    if q is None or not (zero_int8_point(q) and zero_int8_point(dq)) or not const_equal(q.inputs[1], dq.inputs[1]):
        return None
    scale = const(q.inputs[1])
    if scale is None or scale.dtype != np.float32:
        return None
    if axis is None:
        return (q.inputs[0], q.inputs[1]) if scale.size == 1 else None
    if scale.ndim != 1 or any(n.attributes.get_int("axis", 1) != axis for n in (q, dq)):
        return None
    return q.inputs[0], q.inputs[1]


def _reshape_to(value: ir.Value, target: list[int]) -> ir.Value | None:
    """The input of Reshape(input, target) with that constant target, or None."""
    node = producer(value, "Reshape")
    shape = const(node.inputs[1]) if node is not None and len(node.inputs) > 1 else None
    return node.inputs[0] if shape is not None and shape.tolist() == target else None


def _int8_input(value: ir.Value, heads: int) -> tuple[Int8Input, str] | None:
    merged = _reshape_to(value, [0, 0, -1])
    if merged is not None:
        inner = _qdq(merged, axis=2)
        split = producer(inner[0], "Reshape") if inner else None
        target = const(split.inputs[1]) if split is not None else None
        if inner is None or target is None or target.tolist()[:3] != [0, 0, heads] or const(inner[1]).size != heads:
            return None
        return Int8Input(split.inputs[0], inner[1]), "per_head"
    inner = _qdq(value, axis=None)
    return (Int8Input(*inner), "per_tensor") if inner else None


def match_int8_attention(node: ir.Node) -> Int8Attention | None:
    """The FA3 form around this MultiHeadAttention, or None."""
    found = plain_attention(node)
    if found is None:
        return None
    query, key, value, bias = found
    heads = node.attributes.get_int("num_heads", 0)
    width = query.shape[2] if query.shape is not None and query.shape.rank() == 3 else None
    if heads <= 0 or not isinstance(width, int) or width % heads:
        return None
    quantized = [_int8_input(v, heads) for v in (query, key, value)]
    if any(f is None for f in quantized) or len({layout for _, layout in quantized}) != 1:
        return None
    if any(f.source.shape is None or f.source.shape.rank() != 3 for f, _ in quantized):
        return None
    head_dim = width // heads
    scale = softmax_scale(node, head_dim)
    (q, layout), (k, _), (v, _) = quantized
    return Int8Attention(node.name, node, q, k, v, bias, heads, head_dim, scale, layout)


def int8_attention_spec(match: Int8Attention, isa: str, family: str) -> KernelSpec:
    return KernelSpec(op=OP, family=family, isa=isa,
                      dtypes=(("query", "float32"), ("qkv", "int8"), ("output", "float32")),
                      static_dims=(("head_dim", match.head_dim), ("heads", match.heads)),
                      dynamic_dims=("batch", "seq", "kv_seq"), scale_layout=match.layout,
                      epilogue="attention_bias" if match.bias is not None else "")


def int8_attention_to_generated(graph: ir.Graph, match: Int8Attention, spec: KernelSpec) -> ir.Value:
    """Replace the MultiHeadAttention (and, once unused, its Q/K/V quantization) by one QAttentionInt8 node."""
    inputs = [match.query.source, match.key.source, match.value.source,
              match.query.scale, match.key.scale, match.value.scale]
    if match.bias is not None:
        inputs.append(match.bias)
    node = ir.node(OP, inputs, {"spec": spec.id, "scale": float(match.softmax_scale)}, domain=DOMAIN,
                   name=match.layer)
    graph.append(node)
    old = match.attention.outputs[0]
    node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, old.shape
    take_over(graph, old, node.outputs[0], [match.attention])
    return node.outputs[0]
