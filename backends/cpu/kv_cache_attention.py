"""KV-cache attention: the int8-cache form `kv_cache` writes around MultiHeadAttention, as one op.

passes/kv_cache.py makes a decoder's cache int8 with standard ops: each past K/V is
dequantized on entry, concatenated with this step's K/V, the whole present is quantized on
its way out and dequantized again for the attention, then (grouped-query attention) the KV
heads are repeated to the query heads. onnxruntime has no attention that reads an int8
cache, so every step widens and re-quantizes the whole past: the int8 cache costs time
instead of saving it. This module finds that form around each com.microsoft
MultiHeadAttention and replaces it with one `com.qcompile.QAttentionKVCache` node, which
copies the int8 past, quantizes only the new rows and attends over the int8 cache directly.

The two cache codecs of passes/kv_cache.py are recognised:
  per_head:    DequantizeLinear(q, scale[KVH], axis=1) and QuantizeLinear(x, scale[KVH], axis=1)
  per_channel: Mul(DequantizeLinear(q, 1), s[1, KVH, 1, D]) and QuantizeLinear(Div(x, s), 1)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.kernelgen import DOMAIN, KernelSpec
from qcompile.qdq import take_over

from .kernel_match import const, const_equal, plain_attention, producer, softmax_scale, zero_int8_point

OP = "QAttentionKVCache"


@dataclasses.dataclass
class CacheSide:
    """One of K or V: the cache tensors and their codec."""
    past: ir.Value            # graph input, int8 [B, KVH, P, D]
    fresh: ir.Value           # this step's float [B, KVH, S, D]
    present: ir.Value         # graph output, int8 [B, KVH, P+S, D]
    scale: ir.Value           # constant: [KVH] (per_head) or [1, KVH, 1, D] (per_channel)
    layout: str               # per_head | per_channel
    outlet: list[ir.Node]     # from the present's quantization to the repeat: their readers move to the new node


@dataclasses.dataclass
class KVCacheAttention:
    layer: str                # the MultiHeadAttention node's name
    attention: ir.Node
    query: ir.Value
    bias: ir.Value | None
    key: CacheSide
    value: CacheSide
    q_heads: int
    kv_heads: int
    head_dim: int
    softmax_scale: float


def _dequantized_cache(value: ir.Value) -> tuple[ir.Value, ir.Value, str, list[ir.Node]] | None:
    """(int8 source, scale, layout, nodes) of a value the cache codec dequantized, or None."""
    mul = producer(value, "Mul")
    if mul is not None:      # per_channel: DQ with a unit scale, times the [1, KVH, 1, D] scale
        dq = producer(mul.inputs[0], "DequantizeLinear")
        outer = mul.inputs[1]
        if dq is None or not _unit_codec(dq) or const(outer) is None or const(outer).ndim != 4:
            return None
        return dq.inputs[0], outer, "per_channel", [dq, mul]
    dq = producer(value, "DequantizeLinear")
    if dq is None or len(dq.inputs) < 2 or dq.attributes.get_int("axis", 1) != 1 or not zero_int8_point(dq):
        return None
    scale = const(dq.inputs[1])
    if scale is None or scale.ndim != 1:
        return None
    return dq.inputs[0], dq.inputs[1], "per_head", [dq]


def _quantized_cache(value: ir.Value) -> tuple[ir.Value, ir.Value, str, list[ir.Node]] | None:
    """(float source, scale, layout, nodes) of a value the cache codec quantized, or None."""
    q = producer(value, "QuantizeLinear")
    if q is None or not zero_int8_point(q):
        return None
    if _unit_codec(q):
        div = producer(q.inputs[0], "Div")
        if div is None or const(div.inputs[1]) is None or const(div.inputs[1]).ndim != 4:
            return None
        return div.inputs[0], div.inputs[1], "per_channel", [div, q]
    scale = const(q.inputs[1])
    if scale is None or scale.ndim != 1 or q.attributes.get_int("axis", 1) != 1:
        return None
    return q.inputs[0], q.inputs[1], "per_head", [q]


def _unit_codec(node: ir.Node) -> bool:
    scale = const(node.inputs[1]) if len(node.inputs) > 1 else None
    return scale is not None and scale.size == 1 and float(scale.reshape(())) == 1.0 and zero_int8_point(node)


def _repeated_heads(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Under Hugging Face's repeat_kv (Unsqueeze at axis 2 -> Expand -> Reshape), the KV-head
    tensor it repeats; else the value itself."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand else None
    if unsqueeze is None:
        return value, []
    axes = const(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if axes is None:
        attr = unsqueeze.attributes.get("axes")
        axes = np.asarray(attr.as_ints()) if attr is not None else None
    if axes is None or axes.reshape(-1).tolist() != [2]:
        return value, []
    return unsqueeze.inputs[0], [unsqueeze, expand, reshape]


def _cache_side(value: ir.Value) -> CacheSide | None:
    """The cache chain feeding MultiHeadAttention's key or value input."""
    cached, repeat = _repeated_heads(value)
    inner = _dequantized_cache(cached)
    if inner is None:
        return None
    present, scale, layout, deq_nodes = inner
    outer = _quantized_cache(present)
    if outer is None or not present.is_graph_output() or present.dtype != ir.DataType.INT8:
        return None
    joined, q_scale, q_layout, q_nodes = outer
    concat = producer(joined, "Concat")
    if q_layout != layout or not const_equal(q_scale, scale) or concat is None or len(concat.inputs) != 2:
        return None
    entry = _dequantized_cache(concat.inputs[0])
    if entry is None:
        return None
    past, past_scale, past_layout, _ = entry
    if past_layout != layout or not const_equal(past_scale, scale) or not past.is_graph_input() \
            or past.dtype != ir.DataType.INT8 or past.shape is None or past.shape.rank() != 4:
        return None
    if concat.attributes.get_int("axis", 0) not in (2, -2):
        return None
    kv_heads, head_dim = past.shape[1], past.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        return None
    expected = kv_heads if layout == "per_head" else kv_heads * head_dim
    if const(scale).size != expected:
        return None
    # the past's dequantization and the Concat stay upstream; once nothing reads them they go
    return CacheSide(past, concat.inputs[1], present, scale, layout, q_nodes + deq_nodes + repeat)


def _upstream(values: list[ir.Value], limit: int = 100_000) -> set[int]:
    """ids of the nodes the values are computed from (to refuse a rewrite that would cycle)."""
    seen: set[int] = set()
    stack = [v.producer() for v in values if v is not None and v.producer() is not None]
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


def match_kv_cache_attention(node: ir.Node) -> KVCacheAttention | None:
    """The int8-cache form around this MultiHeadAttention, or None."""
    found = plain_attention(node)
    if found is None:
        return None
    query, key, value, bias = found
    if query.shape is None or query.shape.rank() != 3:
        return None
    k_side, v_side = _cache_side(key), _cache_side(value)
    if k_side is None or v_side is None or k_side.layout != v_side.layout:
        return None
    q_heads = node.attributes.get_int("num_heads", 0)
    kv_heads, head_dim = k_side.past.shape[1], k_side.past.shape[3]
    if (v_side.past.shape[1], v_side.past.shape[3]) != (kv_heads, head_dim) or q_heads <= 0 \
            or q_heads % kv_heads or (isinstance(query.shape[2], int) and query.shape[2] != q_heads * head_dim):
        return None
    redirected = {id(n) for n in k_side.outlet + v_side.outlet + [node]}   # their outputs become the new node's
    if redirected & _upstream([query, bias, k_side.fresh, v_side.fresh]):
        return None                          # the new node would feed itself
    return KVCacheAttention(node.name, node, query, bias, k_side, v_side, q_heads, kv_heads, head_dim,
                            softmax_scale(node, head_dim))


def attention_spec(match: KVCacheAttention, isa: str, family: str) -> KernelSpec:
    return KernelSpec(op=OP, family=family, isa=isa,
                      dtypes=(("query", "float32"), ("cache", "int8"), ("output", "float32")),
                      static_dims=(("head_dim", match.head_dim), ("q_heads", match.q_heads),
                                   ("kv_heads", match.kv_heads)),
                      dynamic_dims=("batch", "seq", "past"), scale_layout=match.key.layout,
                      epilogue="attention_bias" if match.bias is not None else "")


def attention_to_generated(graph: ir.Graph, match: KVCacheAttention, spec: KernelSpec) -> ir.Value:
    """Replace the MultiHeadAttention and both cache chains by one QAttentionKVCache node."""
    k, v = match.key, match.value
    inputs = [match.query, k.fresh, v.fresh, k.past, v.past, k.scale, v.scale]
    if match.bias is not None:
        inputs.append(match.bias)
    node = ir.node(OP, inputs, {"spec": spec.id, "scale": float(match.softmax_scale)}, num_outputs=3,
                   domain=DOMAIN, name=match.layer)
    graph.append(node)
    out, present_k, present_v = node.outputs
    old = match.attention.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, old.shape
    for new, side in ((present_k, k), (present_v, v)):
        new.dtype, new.shape = ir.DataType.INT8, side.present.shape
    take_over(graph, old, out, [match.attention])
    for new, side in ((present_k, k), (present_v, v)):
        take_over(graph, side.present, new, [])
    return node.outputs[0]
