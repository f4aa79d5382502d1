"""Residual skip inputs: a residual Add quantized on its skip input only, where the target's
placement asks for it (its descriptor's `residual_skip_inputs`, e.g. TensorRT).

Why: TensorRT fuses a Conv with the residual Add after it (conv + add + ReLU, int8 in and out)
when the Add's other input — the skip, the identity branch — arrives quantized; the Conv's own
output stays unquantized (no Q/DQ on layer outputs). NVIDIA's explicit-quantization placement
guidance and ModelOpt's ONNX quantizer place it the same way. The skip tensor gets its own
calibrated scale, or shares the Q/DQ pair it already has as another layer's input.
"""

from __future__ import annotations

import onnx_ir as ir

from .plan import LayerPlan


def residual_skip(node: ir.Node, branches: set[ir.Value]) -> ir.Value | None:
    """The skip input of a two-input Add one of whose inputs is in `branches` (quantized Conv
    outputs: what TensorRT fuses the Add into) and the other a computed tensor; None for any
    other node, an Add of two such branches or one with a constant (no single skip)."""
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is None or b is None or a.const_value is not None or b.const_value is not None:
        return None
    if (a in branches) == (b in branches):
        return None
    return b if a in branches else a


def residual_skips(model: ir.Model, plans: list[LayerPlan]) -> list[tuple[ir.Node, ir.Value]]:
    """(Add, skip input) for each residual Add after a static quantized Conv."""
    conv_outputs = {p.node.outputs[0] for p in plans if p.static and p.node.op_type == "Conv"}
    found = [(node, residual_skip(node, conv_outputs)) for node in model.graph]
    return [(node, skip) for node, skip in found if skip is not None]
