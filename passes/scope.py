"""Which layers a pass touches: its recipe's `include` / `exclude` globs on node names, and
which layers are a model's output layers (from the graph)."""

from __future__ import annotations

import fnmatch

import onnx_ir as ir


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def in_scope(name: str | None, config) -> bool:
    """True when `name` matches one of config.include and none of config.exclude."""
    return matches(name or "", config.include) and not matches(name or "", config.exclude)


_SHAPE_ONLY = ("Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def feeds_model_output(node: ir.Node, outputs: set) -> bool:
    """Whether the node's output is a model output, directly or through shape-only ops (a
    decoder's logits projection, a classifier head)."""
    value = node.outputs[0]
    while value not in outputs:
        users = value.uses()
        if len(users) != 1 or users[0].node.op_type not in _SHAPE_ONLY:
            return False
        value = users[0].node.outputs[0]
    return True
