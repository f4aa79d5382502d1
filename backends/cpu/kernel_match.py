"""Small structural-matching helpers the generated-kernel lowerings share."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompile.qdq import take_over


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array, or None when it is computed."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def const_equal(a: ir.Value, b: ir.Value) -> bool:
    """The same constant (one initializer, or two with equal arrays)."""
    if a is b:
        return True
    x, y = const(a), const(b)
    return x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def producer(value: ir.Value | None, op: str) -> ir.Node | None:
    """The standard-domain `op` node computing `value`, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading `value` (which is no graph output), or None."""
    users = [u.node for u in value.uses()]
    return users[0] if len(users) == 1 and not value.is_graph_output() else None


def only_use(value: ir.Value, op: str) -> ir.Node | None:
    """The one `op` node reading `value` (which is no graph output), or None."""
    node = sole_reader(value)
    return node if node is not None and node.op_type == op else None


def bias_reader(output: ir.Value, n: int) -> tuple[ir.Node, ir.Value] | None:
    """(node, bias) when `output`'s one reader adds a constant float32 bias [N] a MatMul kernel's
    epilogue can take instead: an Add(output, bias), or the com.microsoft BiasGelu `fuse` writes
    after an FFN input layer (which then becomes a plain Gelu: `take_over_layer`)."""
    node = sole_reader(output)
    if node is None or len(node.inputs) != 2 or node.inputs[0] is not output:
        return None
    plain_add = node.op_type == "Add" and node.domain in ("", "ai.onnx")
    bias_gelu = node.op_type == "BiasGelu" and node.domain == "com.microsoft"
    bias = const(node.inputs[1])
    if not (plain_add or bias_gelu) or bias is None or bias.dtype != np.float32 or bias.shape != (n,):
        return None
    return node, node.inputs[1]


def gelu_reader(output: ir.Value) -> ir.Node | None:
    """The com.microsoft Gelu that is `output`'s one reader (`fuse`'s GELU, or a BiasGelu whose
    bias moved into the MatMul before it), or None."""
    node = sole_reader(output)
    ok = node is not None and node.op_type == "Gelu" and node.domain == "com.microsoft" and len(node.inputs) == 1 \
        and node.inputs[0] is output
    return node if ok else None


def take_over_layer(graph: ir.Graph, old: ir.Value, new: ir.Value, remove: list[ir.Node],
                    bias_gelu: ir.Node | None = None) -> ir.Value:
    """`new` (a kernel's output) replaces the layer's result `old` and the `remove` nodes leave;
    returns the value holding the layer's result, the tensor verify's per-layer table compares.

    Where the bias of a BiasGelu moved into the kernel, `new` is MatMul + bias, a sum the graph
    had no name for: it gets a name of its own (under the MatMul output's name it would be
    compared with the bias-free MatMul output of the original), the BiasGelu becomes a plain
    Gelu in place (its output may already be the next layer's matched input), and the layer is
    compared after the Gelu. onnxruntime's BiasGelu costs an Add and a Gelu (MiniLM's
    [16, 64, 1536]: 2.5 ms against 0.9 ms for Gelu alone); a MatMul epilogue adds a bias for free."""
    take_over(graph, old, new, remove)
    if bias_gelu is None:
        return new
    new.name = f"{new.name}_plus_bias"
    bias_gelu.op_type = "Gelu"
    bias_gelu.resize_inputs(1)
    return bias_gelu.outputs[0]


def is_scalar(value: ir.Value, expected: float) -> bool:
    array = const(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == expected


def zero_int8_point(node: ir.Node) -> bool:
    """A QuantizeLinear/DequantizeLinear whose zero point is a constant int8 0 (symmetric int8)."""
    zp = const(node.inputs[2]) if len(node.inputs) > 2 else None
    return zp is not None and zp.dtype == np.int8 and not zp.any()


def plain_attention(node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value | None] | None:
    """(query, key, value, attention_bias) of a com.microsoft MultiHeadAttention that uses
    nothing else a generated attention does not serve: no packed Q/K/V bias, no key padding
    mask, no past of its own, not `unidirectional`, and no reader of its present outputs."""
    if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft" or len(node.inputs) > 8:
        return None
    query, key, value, qkv_bias, padding, bias, past_k, past_v = list(node.inputs) + [None] * (8 - len(node.inputs))
    if any(v is not None for v in (qkv_bias, padding, past_k, past_v)) or None in (query, key, value):
        return None
    if node.attributes.get_int("unidirectional", 0) or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    return query, key, value, bias


def softmax_scale(node: ir.Node, head_dim: int) -> float:
    """A fused attention's `scale` attribute, or its default 1/sqrt(head_dim)."""
    return node.attributes.get_float("scale", 0.0) or 1.0 / math.sqrt(head_dim)
