"""cuda_lower: check the QDQ graph is the one TensorRT builds as intended, and say how to build it.

The quantize pass already placed the Q/DQ the cuda descriptor asks for (int8 symmetric, inputs
only, residual skip inputs); this pass reads the result back rule by rule (placement.py),
records it in report.json (`cuda`), warns where a rule does not hold, refuses operators
TensorRT's ONNX parser does not know (a custom domain), gives verification an onnxruntime-
runnable twin where FP8 Q/DQ would not run there, and writes OUT/trtexec.sh. The generated
CUDA kernels are the next lowering step's (cuda_kernels.py); nothing here ran on a GPU.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qcompile.errors import TargetError
from qcompile.facts import Fact
from qcompile.output import script_writer
from qcompile.registry import QPass, register_pass

from .placement import placement

TRTEXEC = """#!/bin/sh
# Build a TensorRT engine from the explicit-quantization graph qcompile wrote for {target}
# ({gpu}). Strongly typed: TensorRT keeps the precisions the Q/DQ nodes and the model's float
# type say (int8 where Q/DQ are, the model's float elsewhere); add --fp16 without
# --stronglyTyped to let TensorRT run the float layers in half precision instead.
# Dynamic inputs need shapes: --minShapes/--optShapes/--maxShapes (trtexec --help).
set -e
cd "$(dirname "$0")"
trtexec --onnx=model.onnx --stronglyTyped --saveEngine=model.plan "$@"
"""


@register_pass("cuda_lower")
class CudaLower(QPass):
    """Check TensorRT's Q/DQ placement rules on the compiled graph; refuse foreign ops; write trtexec.sh."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        trtexec_script: bool = True

    GIVES = frozenset({Fact.LOWERED})

    def run(self, model: ir.Model) -> bool:
        ctx, target = self.ctx, self.ctx.target
        found = placement(model.graph)
        if found.foreign_ops:
            raise TargetError(f"TensorRT's ONNX parser does not know {len(found.foreign_ops)} operators of this graph "
                              f"(e.g. {found.foreign_ops[0]})",
                              hint="compile the model without them (an export without onnxruntime-specific "
                                   "fusions), or use --target cpu for onnxruntime")
        for problem in found.problems():
            ctx.warn(f"TensorRT placement: {problem}")
        names = set(found.layers)
        for record in ctx.layers.quantized():
            if record.name in names:
                act = record.scheme.activation if record.scheme is not None else None
                dtype = act.dtype if act is not None else (record.scheme.weight.dtype if record.scheme else "?")
                record.lowering["lowered_to"] = f"TensorRT {dtype} {record.op} (explicit Q/DQ)"
        simulated = self._fp8_reference(model)
        ctx.reports["cuda"] = {"architecture": target.variant, "gpu": target.setting("gpu"),
                               "placement": found.summary(),
                               "verified": "model.onnx" if not simulated else
                               f"a reference lowering: {simulated} FP8 activation Q/DQ pairs as Cast arithmetic "
                               "(onnxruntime CPU has no FP8 kernels and its optimizer would fuse them into int8 ones)",
                               "ran_on_gpu": False}
        if self.config.trtexec_script:
            script = TRTEXEC.format(target=f"{target.name}:{target.variant}", gpu=target.setting("gpu"))
            ctx.outputs.artifacts["trtexec.sh"] = script_writer(script)
        return False

    def _fp8_reference(self, model: ir.Model) -> int:
        """Where the graph holds FP8 activation Q/DQ, verification runs a copy with them as the
        same arithmetic in Cast ops (backends/cpu/forms.simulated_qdq: onnxruntime CPU fuses FP8
        Q/DQ around a Conv/MatMul into int8 kernels that reject FP8); model.onnx keeps them for
        TensorRT. Returns how many pairs the copy rewrote."""
        from qcompile.backends.cpu.forms import simulated_qdq
        if not any(n.op_type == "QuantizeLinear" and n.outputs[0].dtype in _FLOAT8 for n in model.graph):
            return 0
        reference = model.clone()
        count = sum(simulated_qdq(reference.graph, n) == "float8" for n in list(reference.graph)
                    if n.op_type == "QuantizeLinear")
        reference.graph.sort()
        self.ctx.outputs.reference_model = reference
        return count


_FLOAT8 = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2)
