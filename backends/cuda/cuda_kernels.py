"""cuda_kernels: generated CUDA kernels for the quantized linears, beside the TensorRT graph.

TensorRT builds model.onnx (its static Q/DQ graph) itself; what it has no kernel for is
per-token dynamic W8A8, which tracks activation outliers that vary by token (LLMs) where a
static per-tensor scale cannot. This pass serves every quantized MatMul of the compiled graph
with two generated kernels — per-token int8 quantization (QuantizePerToken.cu.j2) and a W8A8
GEMM on CUTLASS with the dequantization and bias in its epilogue (QGemmW8A8.cu.j2) — and
writes, beside model.onnx:

* OUT/model.kernels.onnx: the same model with each such layer as one
  `com.qcompile.QMatMulPerToken` node (the op contract the CPU family already serves), for
  onnxruntime-gpu users: the CUDA library registers that op for CUDAExecutionProvider
  (ort_ops.cu.j2, the stream from KernelContext_GetGPUComputeStream). Verification runs it
  in onnxruntime CPU through the CPU family's kernels for the same op — its reference
  lowering: same arithmetic, so its fidelity is the CUDA kernels' (up to fp32 reassociation);
* OUT/kernels/: the sources, a C ABI header, CMakeLists.txt (the variant's architecture), the
  library built with nvcc where one is installed (no GPU needed to build), manifest.json,
  layers.npz (one real layer per kernel: its input on calibration sample 0, its weights, and
  the output onnxruntime computed for it in model.onnx) and check.py, the GPU harness (with
  check_references.py, its numpy references).

Layers a template cannot serve (qdq_matmul.py says why: K not a multiple of 16, N not a multiple
of 4, a weight that is not int8 per channel, a Gemm) keep their Q/DQ form in both files, with
the reason in report.json (`cuda_kernels.not_served`). Nothing here runs on a GPU: check.py
does, where one is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.backends.cpu import per_token_matmul
from qcompile.backends.cpu.generated_kernels import TEMPLATES as CPU_TEMPLATES
from qcompile.backends.cpu.kernel_match import take_over_layer
from qcompile.facts import Fact
from qcompile.kernelgen import DOMAIN, KernelSpec, manifest
from qcompile.kernelgen.build import (CUDA_LIBRARY, BuildFailed, build, build_cuda, cuda_cmakelists, cuda_commands)
from qcompile.kernelgen.cutlass_headers import CutlassUnavailable, find_cutlass
from qcompile.kernelgen.ort_headers import HeadersUnavailable, find_headers
from qcompile.kernelgen.render import header_comment, render_sources
from qcompile.kernelgen.spec import DOMAIN_VERSION
from qcompile.ort_session import use_generated_library
from qcompile.pass_context import CompanionModel
from qcompile.qdq import add_initializer
from qcompile.registry import QPass, register_pass
from qcompile.versions import package_version

from .qdq_matmul import StaticQdqMatMul, match_static_qdq_matmul

FAMILY = "cuda"
TEMPLATES = Path(__file__).resolve().parent / "kernels"
KERNELS_DIR = "kernels"
KERNELS_MODEL = "model.kernels.onnx"
LIBRARY_TEMPLATES = ("qcompile_cuda_kernels.h.j2", "ort_ops.cu.j2")
GRAPH_TABLE = "qcompile_graph_specs.h"
HARNESS = ("check.py", "check_references.py")   # the GPU harness and its numpy references, copied into OUT/kernels/
CUDA_LIBRARY_METADATA = "qcompile.kernels.cuda_library"   # model.kernels.onnx: its library, for CUDAExecutionProvider
REFERENCE_ISA = "avx512_vnni"     # the CPU reference library's spec (its vector paths are picked at run time)
# nvcc architectures per variant: Hopper's GEMM uses wgmma, which only the arch-specific sm_90a has
ARCHITECTURES = {"sm80": ("80",), "sm89": ("89",), "sm90": ("90a",)}


def graph_spec(match: StaticQdqMatMul) -> KernelSpec:
    """The com.qcompile.QMatMulPerToken node's spec in model.kernels.onnx: the CPU family's spec
    for the same op (the reference lowering's library is built from it)."""
    return per_token_matmul.qmatmul_spec(match.weight, REFERENCE_ISA, "cpu", gelu=False)


def kernel_spec(op: str, dtypes: dict[str, str], dims: dict[str, int], variant: str, epilogue: str = "",
                layout: str = "") -> KernelSpec:
    """A CUDA kernel's spec (rows, M, are dynamic), for the lowering, the GPU bench and the tests."""
    return KernelSpec(op=op, family=FAMILY, isa=variant, dtypes=tuple(dtypes.items()),
                      static_dims=tuple((k, int(v)) for k, v in dims.items()), dynamic_dims=("M",),
                      scale_layout=layout, epilogue=epilogue)


def cuda_specs(match: StaticQdqMatMul, variant: str) -> tuple[KernelSpec, KernelSpec]:
    """(per-token quantization, W8A8 GEMM): the two CUDA kernels one QMatMulPerToken runs."""
    k, n = match.weight.const_value.shape
    quant = kernel_spec("QuantizePerToken", {"activation": "float32"}, {"K": k}, variant, layout="per_token")
    gemm = kernel_spec("QGemmW8A8", {"activation": "int8", "weight": "int8", "output": "float32"}, {"K": k, "N": n},
                       variant, "bias", "per_token x per_channel")
    return quant, gemm


@register_pass("cuda_kernels")
class CudaKernels(QPass):
    """Serve the quantized MatMuls with generated CUDA kernels: model.kernels.onnx and OUT/kernels/."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        enabled: bool = True
        # compile the library with nvcc here (no GPU needed; about half a minute per GEMM shape,
        # cached by content); false: emit the sources and the build command only
        build: bool = True
        # record one real layer per kernel (layers.npz, calibration sample 0) for check.py
        record_layers: bool = True

    GIVES = frozenset({Fact.LOWERED})

    def run(self, model: ir.Model) -> bool:
        if not self.config.enabled:
            return False
        ctx, variant = self.ctx, self.ctx.target.variant
        matches, not_served = [], {}
        for node in model.graph:
            found = match_static_qdq_matmul(node)
            if isinstance(found, str):
                not_served[node.name] = found
            elif found is not None:
                matches.append(found)
        report = {"served": len(matches), "not_served": not_served, "architecture": variant}
        ctx.reports["cuda_kernels"] = report
        if not_served:
            layer, reason = next(iter(not_served.items()))
            ctx.warn(f"cuda kernels: {len(not_served)} quantized MatMuls keep the Q/DQ form in {KERNELS_MODEL} "
                     f"(e.g. {layer}: {reason}; report.json → cuda_kernels.not_served)")
        if not matches:
            return False
        graph_specs = {m.layer: graph_spec(m) for m in matches}
        kernels_of = {m.layer: cuda_specs(m, variant) for m in matches}      # layer -> (quantize, gemm)
        pairs = {graph_specs[layer].id: kernels for layer, kernels in kernels_of.items()}
        specs = sorted({s for pair in pairs.values() for s in pair}, key=lambda s: (s.op, s.id))
        version = package_version("qcompile") or "unknown"
        sources = render_sources(TEMPLATES, specs, version, unit="cu", library_templates=LIBRARY_TEMPLATES)
        sources[GRAPH_TABLE] = graph_table(pairs, version)
        archs = ARCHITECTURES[variant]
        built, build_info = self._build(sources, archs)
        layers = {}
        for layer, kernels in kernels_of.items():
            for spec in kernels:
                layers.setdefault(spec.id, []).append(layer)
        doc = manifest(specs, layers=layers, library=CUDA_LIBRARY if built else None, build=build_info)
        doc["graph_ops"] = {gid: {"op": per_token_matmul.OP, "kernels": [s.symbol for s in pair]}
                            for gid, pair in sorted(pairs.items())}
        recorded = self._record(model, matches, kernels_of) if self.config.record_layers and ctx.data is not None \
            else {}
        companion = self._kernels_model(model, matches, graph_specs)
        ctx.outputs.companions[KERNELS_MODEL] = companion
        report.update({"kernels": len(specs), "library": f"{KERNELS_DIR}/{CUDA_LIBRARY}" if built else None,
                       "build": build_info, "kernels_model": KERNELS_MODEL,
                       "recorded_layers": sorted({k.split("/")[0] for k in recorded}),
                       "ran_on_gpu": False})
        ctx.outputs.artifacts[KERNELS_DIR] = _writer(sources, built, doc, recorded, archs)
        return False          # model.onnx itself is unchanged

    def _build(self, sources: dict[str, str], archs: tuple[str, ...]):
        """(the built library or None, what happened): a failure leaves the sources and says why."""
        placeholders = (Path("$CUTLASS_INCLUDE_DIR"), Path("$ORT_INCLUDE_DIR"))
        command = " && ".join(" ".join(c) for c in cuda_commands(sources, archs, placeholders))
        try:
            includes = (find_cutlass().include_dir, find_headers().include_dir)
        except (CutlassUnavailable, HeadersUnavailable) as err:
            self.ctx.warn(f"cuda kernels: not built ({err}); the sources are in {KERNELS_DIR}/")
            return None, {"built": False, "reason": str(err), "command": command}
        if not self.config.build:
            return None, {"built": False, "reason": "cuda_kernels.build is false", "command": command}
        try:
            library = build_cuda(sources, archs, includes)
        except BuildFailed as err:
            self.ctx.warn(f"cuda kernels: not built, the sources and the command are in {KERNELS_DIR}/: {err}")
            return None, {"built": False, "reason": str(err), "command": command}
        return library.path, {"built": True, "compiler": library.compiler, "seconds": round(library.seconds, 1),
                              "cached": library.cached, "architectures": [f"sm_{a}" for a in archs],
                              "command": command}

    def _record(self, model: ir.Model, matches, kernels_of) -> dict[str, np.ndarray]:
        """One layer per kernel, run on calibration sample 0: its input, its weights, and the
        output onnxruntime computed for it in model.onnx (keys `<kernel id>/<name>`)."""
        from qcompile.passes.activation_stream import stream_tensors
        quantizers, gemms = {}, {}
        for m in matches:
            quant, gemm = kernels_of[m.layer]
            quantizers.setdefault(quant.id, m)
            gemms.setdefault(gemm.id, m)
        wanted = {v.name: v for m in (*quantizers.values(), *gemms.values()) for v in (m.x, m.output)}
        values = {}   # one sample; under --max-memory its tensors come block by block
        for arrays, _ in stream_tensors(model, list(wanted.values()), self.ctx.data, samples=1,
                                        label="recording kernel inputs", progress=False, memory=self.ctx.memory):
            values.update(arrays)
        recorded = {}
        for kernel_id, m in quantizers.items():
            recorded[f"{kernel_id}/x"] = values[m.x.name].reshape(-1, m.weight.const_value.shape[0]).astype(np.float32)
        for kernel_id, m in gemms.items():
            k, n = m.weight.const_value.shape
            recorded[f"{kernel_id}/x"] = values[m.x.name].reshape(-1, k).astype(np.float32)
            recorded[f"{kernel_id}/weight_nk"] = np.ascontiguousarray(m.weight.const_value.numpy().T)
            recorded[f"{kernel_id}/weight_scale"] = np.broadcast_to(
                m.weight_scale.const_value.numpy().astype(np.float32).reshape(-1), (n,)).copy()
            recorded[f"{kernel_id}/bias"] = m.bias.const_value.numpy() if m.bias is not None \
                else np.zeros(n, np.float32)
            recorded[f"{kernel_id}/layer_output"] = values[m.output.name].reshape(-1, n).astype(np.float32)
        return recorded

    def _kernels_model(self, model: ir.Model, matches, graph_specs) -> CompanionModel:
        """model.kernels.onnx, and the CPU library that verifies it (the same op's CPU kernels)."""
        twin = model.clone()
        names = {m.layer for m in matches}
        for node in list(twin.graph):
            if node.name not in names:
                continue
            m = match_static_qdq_matmul(node)
            spec = graph_specs[m.layer]
            bias = m.bias
            if bias is None:
                bias = add_initializer(twin.graph, f"{m.layer}_bias", np.zeros(spec.dims()["N"], np.float32))
            kernel = ir.node(per_token_matmul.OP, [m.x, m.weight, m.weight_scale, bias], {"spec": spec.id},
                             domain=DOMAIN, name=m.layer)
            out = kernel.outputs[0]
            out.dtype, out.shape = ir.DataType.FLOAT, m.output.shape
            twin.graph.append(kernel)
            take_over_layer(twin.graph, m.output, out, m.nodes[::-1])
        twin.graph.sort()
        common_passes.RemoveUnusedNodesPass()(twin)
        twin.opset_imports[DOMAIN] = DOMAIN_VERSION
        # its own key: the CPU family's `qcompile.kernels.library` is registered in CPU sessions
        # (qcompile verify), where this library's CUDA-only ops have no kernel
        twin.metadata_props[CUDA_LIBRARY_METADATA] = f"{KERNELS_DIR}/{CUDA_LIBRARY}"
        reference = None
        cpu_specs = sorted(set(graph_specs.values()), key=lambda s: s.id)
        try:
            cpu_sources = render_sources(CPU_TEMPLATES, cpu_specs, package_version("qcompile") or "unknown")
            reference = build(cpu_sources, find_headers()).path
            use_generated_library(reference)
        except (HeadersUnavailable, BuildFailed) as err:
            self.ctx.warn(f"cuda kernels: {KERNELS_MODEL} is not verified (its CPU reference kernels could not be "
                          f"built: {err})")
        return CompanionModel(twin, reference_library=reference,
                              what="the generated-kernel graph, run through the CPU family's kernels for the same "
                                   "com.qcompile ops")


def graph_table(pairs: dict[str, tuple[KernelSpec, KernelSpec]], version: str) -> str:
    """qcompile_graph_specs.h, the onnxruntime wrapper's table (ort_ops.cu.j2 includes it): each
    QMatMulPerToken spec of model.kernels.onnx -> the CUDA kernels that run it."""
    rows = [f'{{"{gid}", {quant.dims()["K"]}, {gemm.dims()["N"]}, &{quant.symbol}, &{gemm.symbol}}},'
            for gid, (quant, gemm) in sorted(pairs.items())]
    return "\n".join([header_comment(None, version), "// {spec id, K, N, quantize, gemm} rows of kGraphSpecs", *rows, ""])


def _writer(sources: dict[str, str], library: Path | None, doc: dict, recorded: dict, archs: tuple[str, ...]):
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in sorted(sources.items()):
            (folder / name).write_text(text)
        (folder / "CMakeLists.txt").write_text(cuda_cmakelists(sources, archs))
        (folder / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
        for harness in HARNESS:
            shutil.copyfile(TEMPLATES / harness, folder / harness)
        if recorded:
            np.savez(folder / "layers.npz", **recorded)
        if library is not None:
            shutil.copyfile(library, folder / CUDA_LIBRARY)
        else:
            (folder / "BUILD.txt").write_text(
                f"The library was not built: {doc['build'].get('reason', '')}\n\nBuild it with CMake (the CUDA "
                f"toolkit, CUTLASS headers, onnxruntime's C API headers):\n  cmake -S . -B build "
                f"-DCUTLASS_INCLUDE_DIR=... -DORT_INCLUDE_DIR=... && cmake --build build\nor with nvcc:\n  "
                f"{doc['build'].get('command', '')}\n")
    return write
