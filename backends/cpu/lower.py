"""cpu_lower: put the QDQ graph in the forms onnxruntime CPU runs, and check the kernels.

Most of the QDQ graph is already what onnxruntime CPU runs; its optimizer fuses
Q/DQ groups into int8 kernels at load time. Two forms are rewritten first
(backends/cpu/forms.py): blocked int4/int8 weight-only MatMuls become MatMulNBits,
and FP8 activation Q/DQ pairs become casts. Then the pass optimizes the model with
onnxruntime, reads the optimized graph back and reports, per quantized layer, the
kernel it got (and a note where that form is slower than fp32: the descriptor's
`slow_forms`) — and which nodes stay float.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Literal
import tempfile

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.facts import Fact
from qcompile.layerwise import optimized_blocks
from qcompile.memory_plan import MemoryPlan
from qcompile.ort_session import session_for
from qcompile.registry import QPass, register_pass

from . import forms

_FLOAT_COMPUTE = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NhwcFusedConv"}


def optimized_nodes(model: ir.Model, memory: MemoryPlan | None = None) -> list[onnx.NodeProto]:
    """The nodes onnxruntime CPU actually runs after its optimizations — under a memory plan,
    block by block (each block optimized on its own: its fusions stay inside it)."""
    if memory is not None:
        return [node for graph in optimized_blocks(model, memory) for node in graph.node]
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        session_for(model, level="all", optimized_path=path, threads=1)
        return list(onnx.load(path, load_external_data=False).graph.node)
    finally:
        os.unlink(path)
        if os.path.exists(path + ".data"):
            os.unlink(path + ".data")


@register_pass("cpu_lower")
class CpuLower(QPass):
    """Verify onnxruntime fuses each quantized layer into an int8 kernel; list float nodes."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        check_kernels: bool = True
        # blocked int4/int8 weight DequantizeLinear -> MatMul as com.microsoft MatMulNBits
        matmulnbits: bool = True
        # MatMulNBits compute precision for weight-only layers: 0 = float (the W4A16 meaning),
        # 4 = int8 (faster, quantizes activations per block at run time). Layers whose input
        # is already int8-quantized (W4A8) or whose scheme quantizes activations per group in
        # the kernel (w8a8-group) always use 4.
        weight_only_accuracy_level: Literal[0, 1, 2, 3, 4] = 0
        # static int8 MatMuls without output Q/DQ as com.microsoft MatMulIntegerToFloat (forms.py says why)
        integer_matmul: bool = True

    GIVES = frozenset({Fact.LOWERED})

    def run(self, model: ir.Model) -> bool:
        changed = self._rewrite_forms(model)
        if self.config.check_kernels:
            self._check_kernels(model)
        return changed

    def _rewrite_forms(self, model: ir.Model) -> bool:
        graph = model.graph
        nbits = 0
        simulated = collections.Counter()
        slow = self.ctx.target.setting("slow_forms") or {}
        for node in list(graph):
            if node.op_type == "QuantizeLinear":
                kind = forms.simulated_qdq(graph, node)
                if kind:
                    simulated[kind] += 1
        quantized = {r.name: r for r in self.ctx.layers.quantized()}
        if self.config.matmulnbits:
            for node in list(graph):
                if node.op_type != "MatMul" or node.name not in quantized:
                    continue
                record = quantized[node.name]
                act = record.scheme.activation if record.scheme is not None else None
                in_kernel = act is not None and act.in_kernel
                dq, why_not = forms.matmulnbits_candidate(node, per_channel=record.weight_only)
                if why_not:
                    if in_kernel:
                        record.note(f"activations stay float: no MatMulNBits ({why_not}), so nothing "
                                            "quantizes them per group")
                    continue
                a = node.inputs[0].producer()
                int8_input = a is not None and a.op_type == "DequantizeLinear"
                level = 4 if int8_input or in_kernel else self.config.weight_only_accuracy_level
                floor = self.ctx.target.setting("matmulnbits_min_accuracy_level", {}).get(forms.weight_bits(dq), 0)
                if level < floor:   # no fast float-compute kernel for these weights: int8 compute, said so
                    record.note(f"int8 compute (MatMulNBits accuracy_level {floor}: activations quantized "
                                        f"per block at run time): {self.ctx.target.name}'s onnxruntime has no fast "
                                        f"float path for {forms.weight_bits(dq)}-bit weights (target.yaml)")
                    level = floor
                forms.to_matmulnbits(graph, node, dq, level)
                quantized[node.name].lowering["lowered_to"] = f"MatMulNBits (accuracy_level {level})"
                quantized[node.name].lowering["speed_note"] = slow.get("matmulnbits_prefill")
                nbits += 1
        integer = 0
        if self.config.integer_matmul:
            for node in list(graph):
                if node.name in quantized and forms.integer_matmul_candidate(node):
                    result = forms.to_matmul_integer_to_float(graph, node)
                    quantized[node.name].output_tensor = result.name   # may now include the bias
                    quantized[node.name].lowering["lowered_to"] = "MatMulIntegerToFloat"
                    integer += 1
        for record in quantized.values():
            if record.float8:
                record.lowering["speed_note"] = slow.get("float8")
            elif record.int4_activations:
                record.lowering["speed_note"] = slow.get("int4_activations")
        if nbits or simulated or integer:
            graph.sort()
            common_passes.RemoveUnusedNodesPass()(model)  # the replaced weights' initializers
            if "com.microsoft" not in model.opset_imports and (nbits or integer):
                model.opset_imports["com.microsoft"] = 1
        self.ctx.reports["cpu_forms"] = {"matmulnbits": nbits, "integer_matmul": integer,
                                        "simulated_activation_qdq": dict(simulated)}
        return bool(nbits or simulated or integer)

    def _check_kernels(self, model: ir.Model) -> None:
        slow = self.ctx.target.setting("slow_forms") or {}
        optimized = optimized_nodes(model, self.ctx.memory)
        int8_ops = set(self.ctx.target.setting("int8_kernels", []))
        counts = collections.Counter(n.op_type for n in optimized)
        float_compute = {n.name: n.op_type for n in optimized if n.op_type in _FLOAT_COMPUTE}
        kernel_of = {}
        for n in optimized:
            if n.op_type in int8_ops:
                kernel_of[n.name] = n.op_type
        fired = missed = 0
        for record in self.ctx.layers.quantized():
            name = record.name
            kernel = _match(name, kernel_of)
            if kernel:
                record.lowering["kernel"] = kernel
                fired += 1
            else:
                record.lowering["kernel"] = "float (no int8 kernel fused: " + \
                    ("DequantizeLinear -> " + float_compute[name] if name in float_compute else "see optimized graph") + ")"
                record.lowering.setdefault("speed_note", slow.get("dequantize_float"))
                missed += 1
        self.ctx.reports["cpu_kernels"] = {
            "isa": self.ctx.target.variant,
            "activation_dtype": self.ctx.target.setting("activation_dtype"),
            "int8_layers": fired, "float_layers_after_fusion": missed,
            "optimized_op_counts": dict(sorted(counts.items())),
        }
        if missed:
            self.ctx.warn(f"{missed} quantized layers did not fuse into an onnxruntime int8 kernel on "
                          f"{self.ctx.target.variant}; they run DequantizeLinear + float (see report.json layers)")


def _match(name: str, kernel_of: dict[str, str]) -> str | None:
    """onnxruntime names a fused QDQ node after the node it replaced (plus a suffix)."""
    if name in kernel_of:
        return kernel_of[name]
    for fused, op in kernel_of.items():
        if fused.startswith(name) and fused[len(name):len(name) + 1] in ("_", "/", "."):
            return op
    return None
