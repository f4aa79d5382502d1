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


def residual_skips(model: ir.Model, plans: list[LayerPlan]) -> list[tuple[ir.Node, ir.Value]]:
    """(Add, skip input) for each two-input Add one of whose inputs is a static quantized Conv's
    output (the branch TensorRT fuses the Add into) and the other a computed tensor; an Add of
    two such Convs, or with a constant, has no single skip and is left alone."""
    conv_outputs = {p.node.outputs[0] for p in plans if p.static and p.node.op_type == "Conv"}
    found = []
    for node in model.graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or a.const_value is not None or b.const_value is not None:
            continue
        if (a in conv_outputs) == (b in conv_outputs):
            continue
        found.append((node, b if a in conv_outputs else a))
    return found
