"""Canonical spellings that let the fusion patterns match TorchScript and hand-built exports.

TorchScript writes `x.view(x.size()[:-1] + (heads, head_dim))` as
`Reshape(x, Concat(Unsqueeze(Gather(Shape(y), 0)), Unsqueeze(Gather(Shape(y), 1)), -1, 32))`.
ONNX shape inference cannot see through the Shape arithmetic, so the reshaped tensor gets
fresh unknown dimensions and onnxscript's attention rules fail their dimension checks
("Dimension 2 ... does not have expected size"). Where the gathered dimension of `y` is
provably the same dimension of `x` at that position (same symbolic name or same size), the
element is Reshape's "copy this dimension" 0, and a shape that becomes all constant is an
initializer: the arithmetic disappears and inference keeps the names.

TorchScript also writes linear biases first (`Add(bias, MatMul(...))`); the fusion
patterns want `Add(MatMul(...), bias)`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.qdq import add_initializer


def _const_ints(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy()).astype(np.int64).reshape(-1)


def _gathered_dim(value: ir.Value) -> ir.SymbolicDim | int | None:
    """The dimension `Unsqueeze(Gather(Shape(y), i))` (or `Gather(Shape(y), [i])`) reads, else None."""
    node = value.producer()
    if node is not None and node.op_type == "Unsqueeze":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    index = _const_ints(node.inputs[1])
    shape_node = node.inputs[0].producer()
    if index is None or index.size != 1 or shape_node is None or shape_node.op_type != "Shape":
        return None
    if "start" in shape_node.attributes or "end" in shape_node.attributes:
        return None
    y = shape_node.inputs[0]
    if y.shape is None or not -y.shape.rank() <= int(index[0]) < y.shape.rank():
        return None
    return y.shape[int(index[0])]


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def reshape_copy_dims(graph: ir.Graph) -> int:
    """Rule `reshape_copy_dims`: a Reshape shape element read from a Shape of the same
    dimension becomes 0 (copy); an all-constant shape becomes an initializer. Returns the
    number of Reshapes rewritten."""
    count = 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.attributes.get_int("allowzero", 0):
            continue
        x, shape = node.inputs[0], node.inputs[1]
        concat = shape.producer() if shape is not None else None
        if concat is None or concat.op_type != "Concat" or x is None or x.shape is None:
            continue
        parts: list[int] | None = []
        for j, part in enumerate(concat.inputs):
            c = _const_ints(part)
            if c is not None:
                parts.extend(int(v) for v in c)
                continue
            dim = _gathered_dim(part)
            if dim is None or j >= x.shape.rank() or len(parts) != j or not _same_dim(dim, x.shape[j]):
                parts = None
                break
            parts.append(0)
        if parts is None or list(parts).count(-1) > 1:
            continue
        node.replace_input_with(1, add_initializer(graph, f"{node.name or shape.name}_shape",
                                                   np.asarray(parts, np.int64)))
        count += 1
    return count


def bias_last(graph: ir.Graph) -> int:
    """Rule `bias_last`: `Add(constant, x)` becomes `Add(x, constant)` (Add commutes)."""
    count = 0
    for node in graph:
        if node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2:
            a, b = node.inputs
            if a is not None and b is not None and a.const_value is not None and b.const_value is None:
                node.replace_input_with(0, b)
                node.replace_input_with(1, a)
                count += 1
    return count


def positive_slice_axes(graph: ir.Graph) -> int:
    """Rule `positive_slice_axes`: Slice axes counted from the end (-1) become counted from
    the start (3) where the input's rank is known; onnxscript's rotary-embedding pattern
    matches the constant axes literally (exporters write both)."""
    count = 0
    for node in graph:
        if node.op_type != "Slice" or len(node.inputs) < 4 or node.inputs[3] is None:
            continue
        axes, x = _const_ints(node.inputs[3]), node.inputs[0]
        if axes is None or not (axes < 0).any() or x is None or x.shape is None:
            continue
        rank = x.shape.rank()
        fixed = np.where(axes < 0, axes + rank, axes).astype(np.int64)
        node.replace_input_with(3, add_initializer(graph, f"{node.name or node.inputs[3].name}_axes", fixed))
        count += 1
    return count


def explicit_defaults(graph: ir.Graph) -> int:
    """Rule `explicit_defaults`: write the defaults torch's dynamo exporter writes and
    onnxscript's patterns match literally — ReduceMean's `noop_with_empty_axes=0`, Slice's
    `steps` of ones — so a TorchScript or hand-built graph fuses the same way."""
    count = 0
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "ReduceMean" and len(node.inputs) > 1 and "noop_with_empty_axes" not in node.attributes:
            node.attributes["noop_with_empty_axes"] = ir.AttrInt64("noop_with_empty_axes", 0)
            count += 1
        elif node.op_type == "Slice" and len(node.inputs) == 4 and node.inputs[3] is not None:
            axes = _const_ints(node.inputs[3])
            if axes is None:
                continue
            node.resize_inputs(5)
            node.replace_input_with(4, add_initializer(graph, f"{node.name or node.outputs[0].name}_steps",
                                                       np.ones(axes.size, np.int64)))
            count += 1
    return count


def reciprocal(graph: ir.Graph) -> int:
    """Rule `reciprocal`: `Div(1, x)` becomes `Reciprocal(x)`. TorchScript writes
    `torch.rsqrt` as `Div(1, Sqrt(.))`; onnxscript's RMSNorm pattern matches `Reciprocal`."""
    count = 0
    for node in list(graph):
        if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        one, x = node.inputs
        if one is None or one.const_value is None or x is None:
            continue
        value = one.const_value.numpy()
        if value.size != 1 or value.dtype.kind != "f" or float(value.reshape(-1)[0]) != 1.0:
            continue
        if x.shape is None or one.shape is None or x.shape.rank() < one.shape.rank():
            continue  # the constant would broadcast the result to a larger rank
        new = ir.node("Reciprocal", [x], name=node.name)
        new.outputs[0].type, new.outputs[0].shape = x.type, x.shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        count += 1
    return count


def static_dims(graph: ir.Graph) -> int:
    """Rule `static_dims`: `Gather(Shape(y), i)` of a dimension inference knows as a number
    becomes that constant. TorchScript computes rotate_half's split point as
    `Shape(x)[-1] // 2`; once the head size is a constant, onnxscript's folding turns the
    arithmetic into the literal split its rotary pattern checks. (`fuse` folds after.)"""
    count = 0
    for node in list(graph):
        if node.op_type != "Gather" or not node.outputs[0].uses():
            continue
        index = _const_ints(node.inputs[1])
        dim = _gathered_dim(node.outputs[0]) if index is not None and index.size == 1 else None
        if not isinstance(dim, int):
            continue
        value = np.full(node.inputs[1].const_value.numpy().shape, dim, np.int64)  # Gather keeps the index's shape
        node.outputs[0].replace_all_uses_with(add_initializer(graph, f"{node.name or node.outputs[0].name}_dim",
                                                              value), replace_graph_outputs=False)
        count += 1
    return count


# in the order `fuse` applies them (each returns how many nodes it rewrote)
RULES = (reshape_copy_dims, static_dims, bias_last, positive_slice_axes, explicit_defaults, reciprocal)
