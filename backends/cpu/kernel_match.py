"""Small structural-matching helpers the generated-kernel lowerings share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


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


def only_use(value: ir.Value, op: str) -> ir.Node | None:
    """The one `op` node reading `value` (which is no graph output), or None."""
    users = [u.node for u in value.uses()]
    if len(users) != 1 or users[0].op_type != op or value.is_graph_output():
        return None
    return users[0]


def is_scalar(value: ir.Value, expected: float) -> bool:
    array = const(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == expected
