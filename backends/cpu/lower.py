"""cpu_lower: check that onnxruntime turns the QDQ graph into int8 kernels.

The QDQ graph is already what onnxruntime CPU runs; what matters is whether its
graph optimizer fuses each quantized layer into an int8 kernel on this host. The
pass optimizes the model with onnxruntime, reads the optimized graph back and
reports, per quantized layer, the kernel it got — and which nodes stay float.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile

import onnx
import onnx_ir as ir

from qcompile.ort_session import session_for
from qcompile.registry import QPass, register_pass

_FLOAT_COMPUTE = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NhwcFusedConv"}


def optimized_graph(model: ir.Model) -> onnx.ModelProto:
    """The graph onnxruntime CPU actually runs after its optimizations."""
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        session_for(model, level="all", optimized_path=path, threads=1)
        return onnx.load(path, load_external_data=False)
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

    @classmethod
    def gives(cls, config) -> set[str]:
        return {"lowered"}

    def run(self, model: ir.Model) -> bool:
        if not self.config.check_kernels:
            return False
        optimized = optimized_graph(model)
        int8_ops = set(self.ctx.target.setting("int8_kernels", []))
        counts = collections.Counter(n.op_type for n in optimized.graph.node)
        float_compute = {n.name: n.op_type for n in optimized.graph.node if n.op_type in _FLOAT_COMPUTE}
        kernel_of = {}
        for n in optimized.graph.node:
            if n.op_type in int8_ops:
                kernel_of[n.name] = n.op_type
        fired = missed = 0
        for name, record in self.ctx.layers.items():
            if record.get("status") != "quantized":
                continue
            kernel = _match(name, kernel_of)
            if kernel:
                record["kernel"] = kernel
                fired += 1
            else:
                record["kernel"] = "float (no int8 kernel fused: " + \
                    ("DequantizeLinear -> " + float_compute[name] if name in float_compute else "see optimized graph") + ")"
                missed += 1
        self.ctx.report["cpu_kernels"] = {
            "isa": self.ctx.target.variant,
            "activation_dtype": self.ctx.target.setting("activation_dtype"),
            "int8_layers": fired, "float_layers_after_fusion": missed,
            "optimized_op_counts": dict(sorted(counts.items())),
        }
        if missed:
            self.ctx.warn(f"{missed} quantized layers did not fuse into an onnxruntime int8 kernel on "
                          f"{self.ctx.target.variant}; they run DequantizeLinear + float (see report.json layers)")
        return False


def _match(name: str, kernel_of: dict[str, str]) -> str | None:
    """onnxruntime names a fused QDQ node after the node it replaced (plus a suffix)."""
    if name in kernel_of:
        return kernel_of[name]
    for fused, op in kernel_of.items():
        if fused.startswith(name) and fused[len(name):len(name) + 1] in ("_", "/", "."):
            return op
    return None
