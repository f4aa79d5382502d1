"""Building blocks for QDQ graphs: initializers, Q→DQ pairs on activations, and
weights stored quantized (int initializer + DequantizeLinear)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .weight_store import stored_tensor


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """A new initializer (renamed if taken); an array is stored where the compile keeps rewritten
    weights (compiler/weight_store.py), a tensor (e.g. `derived_tensor`) as it is."""
    name = _unique(graph, name)
    tensor = _tensor(array, name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _tensor(data: np.ndarray | ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    if isinstance(data, np.ndarray | np.generic):
        return stored_tensor(np.asarray(data), name)
    data.name = name
    return data


def _unique(graph: ir.Graph, name: str) -> str:
    if name not in graph.initializers:
        return name
    i = 1
    while f"{name}_{i}" in graph.initializers:
        i += 1
    return f"{name}_{i}"


def _param_shape(param: np.ndarray, axis: int | None, block_size: int | None) -> np.ndarray:
    """Scale/zero-point layout DequantizeLinear wants: scalar, 1-D per axis, or blocked (full rank)."""
    param = np.asarray(param)
    if block_size:
        return param
    return param.reshape(-1) if axis is not None else param.reshape(())


def dequantize_node(graph: ir.Graph, q_value: ir.Value, scale: np.ndarray, zero_point: np.ndarray, *,
                    base: str, axis: int | None, like: ir.Value | None = None,
                    block_size: int | None = None) -> ir.Node:
    """A DequantizeLinear of `q_value` (appended to `graph`); `block_size` for per-group scales."""
    s = add_initializer(graph, f"{base}_scale", _param_shape(np.asarray(scale, dtype=np.float32), axis, block_size))
    z = add_initializer(graph, f"{base}_zero_point", _param_shape(zero_point, axis, block_size))
    attrs = {"axis": int(axis)} if axis is not None else {}
    if block_size:
        attrs["block_size"] = int(block_size)
    node = ir.node("DequantizeLinear", [q_value, s, z], attrs, name=f"{base}_DequantizeLinear")
    out = node.outputs[0]
    out.name = f"{base}_dequantized"
    out.dtype = ir.DataType.FLOAT
    if like is not None and like.shape is not None:
        out.shape = like.shape
    graph.append(node)
    return node


def store_weight_quantized(graph: ir.Graph, weight: ir.Value, q: np.ndarray, scale: np.ndarray,
                           zero_point: np.ndarray, axis: int | None, block_size: int | None = None) -> ir.Value:
    """Replace a float weight by `q` (an int/fp8 initializer, in its ONNX storage type:
    numerics.to_storage) followed by DequantizeLinear."""
    base = weight.name
    q_init = add_initializer(graph, f"{base}_quantized", q)
    node = dequantize_node(graph, q_init, scale, zero_point, base=base, axis=axis, like=weight,
                           block_size=block_size)
    return node.outputs[0]


def insert_qdq(graph: ir.Graph, value: ir.Value, scale: float | np.ndarray, zero_point: np.ndarray, *,
               through_graph_output: bool = False, consumers: set[ir.Node] | None = None,
               axis: int | None = None) -> ir.Value | None:
    """Route the consumers of `value` (all, or only `consumers`) through QuantizeLinear→DequantizeLinear.

    One Q/DQ pair serves them all; `axis` with 1-D scale/zero point for per-axis parameters. A graph output keeps its float value unless
    `through_graph_output`: then the output itself becomes the DequantizeLinear's
    (same name), which onnxruntime needs to fuse a Conv into QLinearConv.
    """
    base = value.name
    uses = [u for u in value.uses() if consumers is None or u.node in consumers]
    output_index = next((i for i, o in enumerate(graph.outputs) if o is value), None)
    route_output = through_graph_output and output_index is not None
    if not uses and not route_output:
        return None  # only a graph output: nothing downstream to feed with int8
    zp = _param_shape(np.asarray(zero_point), axis, None)
    s = add_initializer(graph, f"{base}_scale", _param_shape(np.asarray(scale, dtype=np.float32), axis, None))
    z = add_initializer(graph, f"{base}_zero_point", zp)
    attrs = {"axis": int(axis)} if axis is not None else {}
    qnode = ir.node("QuantizeLinear", [value, s, z], attrs, name=f"{base}_QuantizeLinear")
    qnode.outputs[0].name = f"{base}_quantized"
    qnode.outputs[0].dtype = ir.DataType.from_numpy(zp.dtype)
    qnode.outputs[0].shape = value.shape
    graph.append(qnode)
    dq = ir.node("DequantizeLinear", [qnode.outputs[0], s, z], attrs, name=f"{base}_DequantizeLinear")
    dq_out = dq.outputs[0]
    dq_out.name = f"{base}_dequantized"
    dq_out.dtype = value.dtype
    dq_out.shape = value.shape
    graph.append(dq)
    for user, index in uses:
        user.replace_input_with(index, dq_out)
    if route_output:
        value.name = f"{base}_float"
        dq_out.name = base
        graph.outputs[output_index] = dq_out
    return dq_out


def take_over(graph: ir.Graph, old: ir.Value, new: ir.Value, remove: list[ir.Node]) -> None:
    """`new` replaces `old` everywhere — its uses, its graph-output slot (onnx_ir's
    replace_all_uses_with) and its name — and the `remove` nodes leave the graph."""
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.remove(remove, safe=True)
    old.name = f"{name}_replaced"
    new.name = name


def set_constant_input(graph: ir.Graph, node: ir.Node, index: int,
                       array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Give `node`'s constant input `index` the value `array` (or tensor), copying the
    initializer first when other nodes share it (they keep the old value)."""
    value = node.inputs[index]
    if len(value.uses()) > 1:
        value = add_initializer(graph, f"{value.name}_rescaled", array)
        node.replace_input_with(index, value)
    else:
        value.const_value = _tensor(array, value.name)
    return value
