"""Per-channel factors folded into a Conv's constant weights: output channel c divided by s_c
(weight row and bias), or input channel j's weights multiplied by s_j (grouped and depthwise
Convs: each group's own). Together they move a factor across the tensor between two layers
without changing the float model (cle, equalize_outputs)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.qdq import add_initializer, set_constant_input

from .channels import scale_input_channels


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def divide_output_channels(graph: ir.Graph, conv: ir.Node, s: np.ndarray) -> None:
    """Output channel c of `conv` divided by s_c: its weight row and its bias (if constant)."""
    w = _const(conv.inputs[1])
    set_constant_input(graph, conv, 1, (w / s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype))
    b = _const(conv.inputs[2]) if len(conv.inputs) > 2 else None
    if b is not None:
        set_constant_input(graph, conv, 2, (b / s).astype(b.dtype))


def multiply_input_channels(graph: ir.Graph, conv: ir.Node, s: np.ndarray) -> None:
    """The weights `conv` applies to input channel j multiplied by s_j."""
    w = _const(conv.inputs[1])
    groups = conv.attributes.get_int("group", 1)
    set_constant_input(graph, conv, 1, scale_input_channels(w, s, 1, groups).astype(w.dtype))


def shift_conv_bias(graph: ir.Graph, conv: ir.Node, shift: np.ndarray) -> None:
    """Add `shift` [Cout] to `conv`'s bias (a bias initializer is created where it has none)."""
    b = _const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
    if b is not None:
        set_constant_input(graph, conv, 2, (b.astype(np.float64) + shift).astype(b.dtype))
        return
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        raise ValueError(f"{conv.name}: the bias is not a constant")
    value = add_initializer(graph, f"{conv.name or conv.outputs[0].name}_bias", np.asarray(shift, np.float32))
    conv.resize_inputs(3)
    conv.replace_input_with(2, value)
