"""A cheap structural signature of a model, to tell whether a pass changed it.

Covers what a pass can change: nodes (op, domain, name, attributes, input/output values),
graph inputs/outputs, every value's name, type and shape, initializers (by name and by tensor
object, so a replaced constant counts without reading its bytes), opsets and metadata. Two
models with equal signatures serialize alike except for tensor contents written in place.
The signature holds the tensor objects themselves (compared by identity), so a tensor freed
during the pass cannot hand its id to its replacement.
"""

from __future__ import annotations

import onnx_ir as ir


def _value(v: ir.Value | None) -> tuple:
    if v is None:
        return ("",)
    shape = tuple(str(d) for d in v.shape) if v.shape is not None else None
    return (v.name, str(v.type), shape, v.const_value)


def signature(model: ir.Model) -> tuple:
    """Compare two signatures with ==; tensors compare by identity (onnx_ir's default)."""
    graph = model.graph
    parts = [tuple(sorted(model.opset_imports.items())), tuple(sorted(model.metadata_props.items())),
             tuple(_value(v) for v in graph.inputs), tuple(_value(v) for v in graph.outputs),
             tuple((name, v.const_value) for name, v in sorted(graph.initializers.items()))]
    for node in graph:
        attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
        parts.append((node.op_type, node.domain, node.name, attrs, tuple(_value(v) for v in node.inputs),
                      tuple(_value(v) for v in node.outputs)))
    return tuple(parts)
