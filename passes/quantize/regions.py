"""Int8 regions: elementwise operators that sit between quantized tensors run on int8 as well.

Why: YOLOX-style detectors put a SiLU (x·sigmoid(x)) between every two Convs. With only the
Convs quantized, each Conv output is dequantized (once per reader: onnxruntime duplicates the
DequantizeLinear), goes through float Sigmoid and Mul and is quantized again for the next Conv;
on ddddocr's detector that is half of the int8 model's time, and the int8 model ran at 1.4×
fp32 where onnxruntime's own static QDQ graph ran at 2.4×. With a Q/DQ pair on the Sigmoid
output as well, onnxruntime fuses DQ→Sigmoid→Q into QLinearSigmoid and DQ,DQ→Mul→Q into
QLinearMul: the feature map never leaves int8.

An operator joins a region when the target runs it on int8 (its descriptor's
`int8_elementwise`) and the region is closed: every input is a quantized tensor (a static
layer's input or output, or another member's output; a constant input would stay float and
break the fusion) and every reader of its output is a quantized layer reading it as its input
or another member. A region that leaks into float operators gains nothing — its output would
be dequantized again — so it is not formed; that keeps PP-LCNet's HardSwish/affine chains,
which onnxruntime's int8 elementwise kernels make slower (docs/benchmarks/cnn), in float.
Decided from the graph alone, before calibration, so the members' output ranges are calibrated
with everything else.
"""

from __future__ import annotations

import onnx_ir as ir

from .plan import LayerPlan


def int8_region(model: ir.Model, plans: list[LayerPlan], ops, *, without: frozenset[str] = frozenset()) -> list[ir.Node]:
    """The members, in graph order, of the closed int8 regions around the static `plans`
    (`without`: node names that may not join, e.g. those whose output has no calibrated range)."""
    ops = set(ops or ())
    if not ops:
        return []
    quantized = {v.name for p in plans if p.static for v in (*p.activations, p.output) if v is not None}
    reads = {(p.node, v.name) for p in plans if p.static for v in p.activations}
    outputs = set(model.graph.outputs)
    members = {n for n in model.graph if n.op_type in ops and n.domain in ("", "ai.onnx")
               and len(n.outputs) == 1 and n.inputs and n.name not in without}
    changed = True
    while changed:
        changed = False
        for node in list(members):
            if not _closed(node, members, quantized, reads, outputs):
                members.discard(node)
                changed = True
    return [n for n in model.graph if n in members]


def _closed(node: ir.Node, members: set, quantized: set, reads: set, outputs: set) -> bool:
    for v in node.inputs:
        if v is None or v.const_value is not None:
            return False
        if v.name not in quantized and v.producer() not in members:
            return False
    out = node.outputs[0]
    if out in outputs or not out.uses():
        return False
    return all(user in members or (user, out.name) in reads for user, _ in out.uses())
