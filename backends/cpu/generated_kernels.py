"""generate_kernels: serve fused quantized ops onnxruntime CPU lacks with generated C++ kernels.

onnxruntime has no fused op for per-token dynamic W8A8 MatMul (its DynamicQuantizeMatMul
is per tensor), so `w8a8-dynamic` layers run as eleven standard ops around MatMulInteger
(compiler/dynamic_qdq.py). This lowering finds that form, replaces each by one
`com.qcompile.QMatMulPerToken` node, collects one `KernelSpec` per distinct (K, N, ISA),
renders the family's templates (backends/cpu/kernels/), builds the library
(compiler/kernelgen/build.py, cached) and registers it in every onnxruntime session of the
compile — so verification runs the very kernels that ship in OUT/kernels/.

Where no library can be had (no compiler, no headers, a failed build) the nodes are put
back in the standard-op form with one warning: the model always runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.dynamic_qdq import integer_layer
from qcompile.errors import TargetError
from qcompile.facts import Fact
from qcompile.kernelgen import DOMAIN, KernelSpec, manifest
from qcompile.kernelgen.build import LIBRARY, BuildFailed, build, cmakelists
from qcompile.kernelgen.ort_headers import HeadersUnavailable, find_headers
from qcompile.kernelgen.render import render_sources, served_ops
from qcompile.kernelgen.spec import DOMAIN_VERSION
from qcompile.ort_session import use_generated_library
from qcompile.qdq import add_initializer, take_over
from qcompile.registry import QPass, register_pass
from qcompile.versions import package_version

FAMILY = "cpu"
TEMPLATES = Path(__file__).resolve().parent / "kernels"     # this family's Jinja templates and helpers
KERNELS_DIR = "kernels"
LIBRARY_METADATA = "qcompile.kernels.library"   # model metadata: the library, relative to model.onnx
_FAST_ISAS = {"avx512_vnni", "avx_vnni", "avx2"}   # x86 variants the templates have vector paths for


@dataclasses.dataclass
class PerTokenMatMul:
    """One per-token W8A8 MatMul in the standard-op form, matched back to its parts."""
    layer: str
    x: ir.Value
    weight: ir.Value            # constant int8 [K, N]
    weight_scale: ir.Value      # constant float32 [N] or scalar
    bias: ir.Value | None       # constant float32 [N]
    output: ir.Value
    nodes: list[ir.Node]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _only_use(value: ir.Value, op: str) -> ir.Node | None:
    users = [u.node for u in value.uses()]
    if len(users) != 1 or users[0].op_type != op or value.is_graph_output():
        return None
    return users[0]


def _is(value: ir.Value, expected: float) -> bool:
    array = _const(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == expected


def match_per_token_matmul(mmi: ir.Node) -> PerTokenMatMul | None:
    """The dynamic_qdq per-token chain ending in this MatMulInteger, or None.

    A structural walk rather than an onnxscript rewrite rule: the replacement must keep the
    layer's name (verify's per-layer table and the report match layers by node name) and the
    chain's own weight, scale and bias initializers, and the pass must be able to put the
    chain back when no library can be built."""
    if mmi.op_type != "MatMulInteger" or len(mmi.inputs) != 3 or not _is(mmi.inputs[2], 128):
        return None
    weight = _const(mmi.inputs[1])
    if weight is None or weight.dtype != np.int8 or weight.ndim != 2:
        return None
    cast = _producer(mmi.inputs[0], "Cast")
    shift = _producer(cast.inputs[0], "Add") if cast else None
    clip = _producer(shift.inputs[0], "Clip") if shift and _is(shift.inputs[1], 128) else None
    rnd = _producer(clip.inputs[0], "Round") if clip and _is(clip.inputs[1], -127) and _is(clip.inputs[2], 127) \
        else None
    ratio = _producer(rnd.inputs[0], "Div") if rnd else None
    scale_node = _producer(ratio.inputs[1], "Max") if ratio else None
    if scale_node is None or not _is(scale_node.inputs[1], float(np.float32(1e-12))):
        return None
    x = ratio.inputs[0]
    div127 = _producer(scale_node.inputs[0], "Div")
    amax = _producer(div127.inputs[0], "ReduceMax") if div127 and _is(div127.inputs[1], 127) else None
    absx = _producer(amax.inputs[0], "Abs") if amax else None
    axes = _const(amax.inputs[1]) if amax and len(amax.inputs) > 1 else None
    if absx is None or absx.inputs[0] is not x or axes is None or axes.tolist() != [-1] \
            or amax.attributes.get_int("keepdims", 1) != 1:
        return None
    scale = scale_node.outputs[0]
    acc_cast = _only_use(mmi.outputs[0], "Cast")
    rescale_x = _only_use(acc_cast.outputs[0], "Mul") if acc_cast else None
    if rescale_x is None or rescale_x.inputs[1] is not scale:
        return None
    rescale_w = _only_use(rescale_x.outputs[0], "Mul")
    n = weight.shape[1]
    weight_scale = _const(rescale_w.inputs[1]) if rescale_w else None
    if weight_scale is None or weight_scale.size not in (1, n) or weight_scale.ndim > 1:
        return None
    nodes = [absx, amax, div127, scale_node, ratio, rnd, clip, shift, cast, mmi, acc_cast, rescale_x, rescale_w]
    inner = [absx, amax, div127, ratio, rnd, clip, shift, cast, mmi, acc_cast, rescale_x]
    if any(len(v.uses()) != 1 or v.is_graph_output() for node in inner for v in node.outputs):
        return None
    if len(scale.uses()) != 2 or scale.is_graph_output() or len(x.uses()) < 2:
        return None
    output, bias = rescale_w.outputs[0], None
    add = _only_use(output, "Add")
    bias_array = _const(add.inputs[1]) if add is not None else None
    if bias_array is not None and bias_array.shape == (n,) and bias_array.dtype == np.float32 \
            and add.inputs[0] is output:
        nodes.append(add)
        output, bias = add.outputs[0], add.inputs[1]
    layer = mmi.name[:-len("_MatMulInteger")] if mmi.name.endswith("_MatMulInteger") else mmi.name
    return PerTokenMatMul(layer, x, mmi.inputs[1], rescale_w.inputs[1], bias, output, nodes)


def qmatmul_spec(weight: ir.Value, isa: str) -> KernelSpec:
    k, n = weight.const_value.shape
    return KernelSpec(op="QMatMulPerToken", family=FAMILY, isa=isa,
                      dtypes=(("activation", "int8"), ("weight", "int8"), ("output", "float32")),
                      static_dims=(("K", int(k)), ("N", int(n))), dynamic_dims=("M",),
                      scale_layout="per_token x per_channel", epilogue="bias")


def to_generated(graph: ir.Graph, match: PerTokenMatMul, spec: KernelSpec) -> ir.Node:
    """Replace the matched standard-op chain by one com.qcompile.QMatMulPerToken node."""
    base = match.layer
    bias = match.bias
    if bias is None:
        bias = add_initializer(graph, f"{base}_bias", np.zeros(match.weight.const_value.shape[1], np.float32))
    inputs = [match.x, match.weight, match.weight_scale, bias]   # the chain's own constants, shared
    node = ir.node("QMatMulPerToken", inputs, {"spec": spec.id}, domain=DOMAIN, name=base)
    out = node.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, match.output.shape
    graph.append(node)
    take_over(graph, match.output, out, match.nodes[::-1])
    return node


def to_standard_ops(graph: ir.Graph, node: ir.Node) -> None:
    """The reference (and fallback) form of a QMatMulPerToken node: compiler/dynamic_qdq.py's."""
    weight, scale, bias = (_const(v) for v in node.inputs[1:4])
    integer_layer(graph, node, node.inputs[0], weight, scale, bias if np.any(bias) else None,
                  per_token=True)


@register_pass("generate_kernels")
class GenerateKernels(QPass):
    """Lower per-token W8A8 MatMuls to generated kernels, build them, register the library."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        enabled: bool = True

    GIVES = frozenset({Fact.LOWERED})

    def run(self, model: ir.Model) -> bool:
        if not self.config.enabled:
            return False
        graph = model.graph
        matches = [m for m in (match_per_token_matmul(n) for n in list(graph)) if m is not None]
        if not matches:
            return False
        isa = self.ctx.target.variant if self.ctx.target.variant in _FAST_ISAS else "generic"
        served = served_ops(TEMPLATES)
        layers: dict[str, list[str]] = {}     # spec id -> the layers it serves (the manifest's view)
        spec_of: dict[str, str] = {}          # layer -> spec id
        nodes = []
        for match in matches:
            spec = qmatmul_spec(match.weight, isa)
            if spec.op not in served:   # a family without this template: say so, keep the layer as it is
                self.ctx.warn(f"no {FAMILY} kernel template serves {spec.op} (K={spec.dims()['K']}, "
                              f"N={spec.dims()['N']}): {match.layer} keeps the standard-op form")
                continue
            nodes.append((to_generated(graph, match, spec), spec))
            layers.setdefault(spec.id, []).append(match.layer)
            spec_of[match.layer] = spec.id
        specs = sorted({s for _, s in nodes}, key=lambda s: s.id)
        sources = render_sources(TEMPLATES, specs, package_version("qcompile") or "unknown")
        try:
            headers = find_headers()
            library = build(sources, headers)
        except (HeadersUnavailable, BuildFailed) as err:
            for node, _ in nodes:
                to_standard_ops(graph, node)
            graph.sort()
            common_passes.RemoveUnusedNodesPass()(model)
            self.ctx.warn(f"generated kernels not built, {len(nodes)} per-token MatMuls stay in the standard-op "
                          f"form (slower): {err}")
            self.ctx.reports["generated_kernels"] = {"built": False, "reason": str(err), "layers": len(nodes)}
            return True
        graph.sort()
        common_passes.RemoveUnusedNodesPass()(model)   # the standard-op chains' constants
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.metadata_props[LIBRARY_METADATA] = f"{KERNELS_DIR}/{LIBRARY}"
        use_generated_library(library.path)
        for record in self.ctx.layers.quantized():
            if record.name in spec_of:
                record.lowering["lowered_to"] = f"{DOMAIN}.QMatMulPerToken (generated kernel {spec_of[record.name]})"
        build_info = {"compiler": library.compiler, "seconds": round(library.seconds, 2), "cached": library.cached,
                      "key": library.key, "headers": f"{headers.source} (ORT_API_VERSION {headers.api_version})"}
        doc = manifest(specs, layers=layers, library=LIBRARY, build=build_info)
        self.ctx.reports["generated_kernels"] = {
            "built": True, "family": FAMILY, "isa": isa, "library": f"{KERNELS_DIR}/{LIBRARY}",
            "kernels": len(specs), "layers": len(nodes), "build": build_info}
        self.ctx.outputs.artifacts[KERNELS_DIR] = _writer(sources, library.path, doc)
        return True


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
