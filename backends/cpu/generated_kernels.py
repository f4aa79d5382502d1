"""generate_kernels: serve fused quantized ops onnxruntime CPU lacks with generated C++ kernels.

onnxruntime has no op for what three quantized forms need, so they run as chains of standard
ops: per-token dynamic W8A8 MatMul (`w8a8-dynamic`, eleven ops around MatMulInteger:
per_token_matmul.py), attention over an int8 KV cache (`w8a8-kv8`: the whole past
dequantized and re-quantized every step: kv_cache_attention.py) and FA3's int8 attention
(`w8a8-fa3`: Q/K/V dequantized in front of a float attention: int8_attention.py). A
companion goes along where the library ships anyway: the residual add + LayerNorm/RMSNorm that
onnxruntime has but runs with a scalar loop (skip_layer_norm.py; `norms`). This
lowering finds those forms (the `LOWERINGS` table: one entry per op), collects one
`KernelSpec` per distinct specialisation, renders the family's templates
(backends/cpu/kernels/), builds the library (compiler/kernelgen/build.py, cached), replaces
each form by one `com.qcompile` node and registers the library in every onnxruntime session
of the compile — so verification runs the very kernels that ship in OUT/kernels/.

The library is built before the graph changes: where none can be had (no compiler, no
headers, a failed build) the graph keeps the standard-op form, with one warning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.errors import TargetError
from qcompile.facts import Fact
from qcompile.kernelgen import DOMAIN, KernelSpec, manifest
from qcompile.kernelgen.build import LIBRARY, BuildFailed, build, cmakelists
from qcompile.kernelgen.ort_headers import HeadersUnavailable, find_headers
from qcompile.kernelgen.render import render_sources, served_ops
from qcompile.kernelgen.spec import DOMAIN_VERSION
from qcompile.ort_session import use_generated_library
from qcompile.registry import QPass, register_pass
from qcompile.versions import package_version

from . import int8_attention, kv_cache_attention, per_token_matmul, skip_layer_norm

FAMILY = "cpu"
TEMPLATES = Path(__file__).resolve().parent / "kernels"     # this family's Jinja templates and helpers
KERNELS_DIR = "kernels"
LIBRARY_METADATA = "qcompile.kernels.library"   # model metadata: the library, relative to model.onnx
_FAST_ISAS = {"avx512_vnni", "avx_vnni", "avx2"}   # x86 variants the templates have vector paths for


@dataclasses.dataclass(frozen=True)
class KernelLowering:
    """One generated op: how the lowering finds the standard-op form it serves, specialises it
    and replaces it. A match object names its node in `.layer`."""
    op: str
    match: Callable[[ir.Node], Any]                  # node -> match or None
    spec: Callable[[Any, str, str], KernelSpec]      # (match, isa, family) -> spec
    rewrite: Callable[[ir.Graph, Any, KernelSpec], ir.Value]   # -> the value holding the layer's result
    what: str                                        # what the op replaces, for messages
    # a companion serves an op onnxruntime has but runs slowly: lowered only where the compile
    # ships a library for the quantized ops anyway, or `norms: always` (Config)
    companion: bool = False


LOWERINGS = (
    KernelLowering(per_token_matmul.OP, per_token_matmul.match_per_token_matmul, per_token_matmul.matched_spec,
                   per_token_matmul.qmatmul_to_generated, "per-token W8A8 MatMul"),
    KernelLowering(kv_cache_attention.OP, kv_cache_attention.match_kv_cache_attention,
                   kv_cache_attention.attention_spec, kv_cache_attention.attention_to_generated,
                   "attention over an int8 KV cache"),
    KernelLowering(int8_attention.OP, int8_attention.match_int8_attention, int8_attention.int8_attention_spec,
                   int8_attention.int8_attention_to_generated, "FA3 int8 attention"),
    KernelLowering(skip_layer_norm.OP, skip_layer_norm.match_skip_norm, skip_layer_norm.skip_norm_spec,
                   skip_layer_norm.skip_norm_to_generated, "residual add + LayerNorm/RMSNorm", companion=True),
)


@register_pass("generate_kernels")
class GenerateKernels(QPass):
    """Lower the fused quantized ops onnxruntime lacks to generated kernels, build them, register the library."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        enabled: bool = True
        # fuse's SkipLayerNormalization / SkipSimplifiedLayerNormalization as the generated
        # SkipLayerNorm (skip_layer_norm.py says why): with_kernels = where the compile ships a
        # kernel library for its quantized ops anyway; always = also where that makes a model
        # need the library it would not otherwise; never
        norms: Literal["with_kernels", "always", "never"] = "with_kernels"

    GIVES = frozenset({Fact.LOWERED})

    def run(self, model: ir.Model) -> bool:
        if not self.config.enabled:
            return False
        graph = model.graph
        isa = self.ctx.target.variant if self.ctx.target.variant in _FAST_ISAS else "generic"
        served = served_ops(TEMPLATES)
        planned = list(self._matches(graph, isa))
        for lowering, match, spec in planned:
            if spec.op not in served:         # a family without this template: say so, keep the node as it is
                dims = ", ".join(f"{k}={v}" for k, v in spec.static_dims)
                self.ctx.warn(f"no {FAMILY} kernel template serves {spec.op} ({dims}): {match.layer} keeps "
                              f"the standard-op form")
        planned = [p for p in planned if p[2].op in served]
        if self.config.norms == "never" or \
                (self.config.norms == "with_kernels" and all(lowering.companion for lowering, _, _ in planned)):
            planned = [p for p in planned if not p[0].companion]
        if not planned:
            return False
        specs = sorted({spec for _, _, spec in planned}, key=lambda s: s.id)
        sources = render_sources(TEMPLATES, specs, package_version("qcompile") or "unknown")
        try:                                  # built before the graph changes: a failure leaves it as it was
            headers = find_headers()
            library = build(sources, headers)
        except (HeadersUnavailable, BuildFailed) as err:
            counts = _counts(planned)
            self.ctx.warn(f"generated kernels not built, {counts} stay in the standard-op form (slower): {err}")
            self.ctx.reports["generated_kernels"] = {"built": False, "reason": str(err), "layers": len(planned)}
            return False
        layers: dict[str, list[str]] = {}     # spec id -> the nodes it serves (the manifest's view)
        spec_of: dict[str, KernelSpec] = {}   # node -> its spec
        built = {spec.id for spec in specs}
        # matched again, one node at a time, as the graph changes: a rewrite replaces values (a
        # layer's output) that the next layer's earlier match still held as its input
        for lowering, match, spec in self._matches(graph, isa, rewrite=True):
            if spec.id not in built:          # not planned above (no template, a companion left out): left as it is
                continue
            result = lowering.rewrite(graph, match, spec)
            record = self.ctx.layers.get(match.layer)
            if record is not None and record.output_tensor:   # verify compares what the kernel computes
                record.output_tensor = result.name
            layers.setdefault(spec.id, []).append(match.layer)
            spec_of[match.layer] = spec
        graph.sort()
        common_passes.RemoveUnusedNodesPass()(model)   # the standard-op chains and their constants
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.metadata_props[LIBRARY_METADATA] = f"{KERNELS_DIR}/{LIBRARY}"
        use_generated_library(library.path)
        for record in self.ctx.layers.quantized():
            spec = spec_of.get(record.name)
            if spec is not None:
                record.lowering["lowered_to"] = f"{DOMAIN}.{spec.op} (generated kernel {spec.id})"
                record.notes = [n for n in record.notes if "not FA3 speed" not in n]   # it is FA3 speed now
        build_info = {"compiler": library.compiler, "seconds": round(library.seconds, 2), "cached": library.cached,
                      "key": library.key, "headers": f"{headers.source} (ORT_API_VERSION {headers.api_version})"}
        doc = manifest(specs, layers=layers, library=LIBRARY, build=build_info)
        self.ctx.reports["generated_kernels"] = {
            "built": True, "family": FAMILY, "isa": isa, "library": f"{KERNELS_DIR}/{LIBRARY}",
            "kernels": len(specs), "layers": len(planned),
            "ops": {op: sorted(n for lw, m, s in planned if lw.op == op for n in [m.layer])
                    for op in sorted({lw.op for lw, _, _ in planned})},
            "build": build_info}
        self.ctx.outputs.artifacts[KERNELS_DIR] = _writer(sources, library.path, doc)
        return True

    @staticmethod
    def _matches(graph: ir.Graph, isa: str, rewrite: bool = False):
        """(lowering, match, spec) for each node a lowering serves, in graph order; with
        `rewrite`, each is matched when the loop reaches it, after the rewrites before it."""
        for node in list(graph):
            if rewrite and node.graph is None:   # taken out by an earlier rewrite
                continue
            for lowering in LOWERINGS:
                match = lowering.match(node)
                if match is not None:
                    yield lowering, match, lowering.spec(match, isa, FAMILY)
                    break


def _counts(planned) -> str:
    """'3 per-token W8A8 MatMul, 2 attention over an int8 KV cache' for messages."""
    by_what: dict[str, int] = {}
    for lowering, _, _ in planned:
        by_what[lowering.what] = by_what.get(lowering.what, 0) + 1
    return ", ".join(f"{n}× {what}" for what, n in by_what.items())


def _writer(sources: dict[str, str], library: Path, doc: dict):
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in sorted(sources.items()):
            (folder / name).write_text(text)
        (folder / "CMakeLists.txt").write_text(cmakelists(sources))
        (folder / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
        shutil.copyfile(library, folder / LIBRARY)
    return write


def library_beside(model_path: str | Path, metadata: dict[str, str]) -> Path | None:
    """The generated-kernel library a compiled model names in its metadata, if it has one."""
    relative = metadata.get(LIBRARY_METADATA)
    if not relative:
        return None
    path = Path(model_path).resolve().parent / relative
    if not path.is_file():
        raise TargetError(f"{model_path} runs generated kernels from {relative}, which is not beside it",
                          hint="keep the compile's kernels/ folder next to model.onnx (or rebuild it with its "
                               "CMakeLists.txt)")
    return path
