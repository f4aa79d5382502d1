"""`qcompile inspect MODEL`: what a compile would find and do, before any calibration.

Reads the model (lazily: external data is not loaded), pins `--input-shape` where given,
infers shapes, and asks the same planner the `quantize` pass uses what the target would do
with each Conv/MatMul/Gemm under the recipe: quantize it (with which scheme), or keep it
float and why (the target's speed threshold, no constant weight, an output layer's scheme).
Also the things that decide a compile before it starts: dynamic dimensions, opset, external
data, half precision, ops onnxruntime cannot run, an existing quantization, a KV cache. The
graph is the one on disk: `canonicalize`/`fuse` may still fold or fuse some layers.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx_ir as ir

from .model_io import dynamic_inputs, fix_input_shapes, infer_shapes, load_model, opset_of, weight_bytes

LAYER_OPS = ("Conv", "MatMul", "Gemm")


def inspect(model_path, *, target: str = "cpu", recipe: str | None = None,
            input_shapes: dict[str, list[int]] | None = None) -> dict:
    """A JSON-able description of the model and the compile's per-layer plan."""
    from qcompile.passes.adopt_qdq import quantized_layers
    from qcompile.passes.quantize.plan import layer_macs, plan_layers

    from .float16 import half_dtype
    from .model_kind import is_decoder, model_family
    from .op_support import unknown_ops
    from .plan import prepare
    from .recipe_choice import choose_recipe

    path = Path(model_path)
    model = load_model(path)
    choice = None
    if recipe is None or recipe == "auto":
        recipe, choice = choose_recipe(path, target)
    tgt, rec = prepare(target, recipe)
    dynamic = dynamic_inputs(model)
    shapes = dict(input_shapes or {}) or _batch_one(model, dynamic)
    if shapes:
        fix_input_shapes(model, shapes)
    else:
        infer_shapes(model)
    external = sorted({str(Path(v.const_value.path).name) for v in model.graph.initializers.values()
                       if isinstance(v.const_value, ir.ExternalTensor)})
    half = half_dtype(model)
    info = {
        "model": str(path), "bytes": path.stat().st_size, "ir_version": model.ir_version,
        "opset": opset_of(model), "opset_imports": dict(model.opset_imports), "producer": model.producer_name,
        "weights_bytes": weight_bytes(model), "external_data": external,
        "float_type": half.name.lower() if half is not None else "float32",
        "inputs": {v.name: _shape(v) for v in model.graph.inputs if v.name not in model.graph.initializers},
        "outputs": {v.name: _shape(v) for v in model.graph.outputs},
        "dynamic_inputs": {k: [d if isinstance(d, int) else str(d) for d in v] for k, v in dynamic.items()},
        "decoder": is_decoder(model), "family": model_family(model), "nodes": model.graph.num_nodes(),
        "ops": dict(collections.Counter(n.op_type for n in model.graph).most_common()),
        "ops_onnxruntime_lacks": unknown_ops(model), "already_quantized": len(quantized_layers(model)),
        "target": tgt.name + (f":{tgt.variant}" if tgt.variant else ""), "recipe": rec.name,
    }
    if choice:
        info["recipe_choice"] = choice
    quantize = next((s for s in rec.steps if s.spec.name == "quantize"), None)
    layers = {}
    if quantize is not None and not info["already_quantized"]:
        plans, skipped = plan_layers(model, quantize.config, tgt)
        planned = {id(p.node): p for p in plans}
        for node in model.graph:
            if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
                continue
            w = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None else None
            entry = {"op": node.op_type, "weight_shape": list(w.shape) if w is not None and w.shape is not None
                     and w.const_value is not None else None, "macs": layer_macs(node)}
            if id(node) in planned:
                entry["plan"] = planned[id(node)].scheme.label()
            else:
                entry["plan"] = "float"
                entry["reason"] = skipped.get(node.name or "", "not planned")
            layers[node.name or f"{node.op_type}#{len(layers)}"] = entry
    info["layers"] = layers
    info["macs_at"] = shapes and {k: list(v) for k, v in shapes.items()}
    return info


def _batch_one(model: ir.Model, dynamic: dict) -> dict[str, list[int]]:
    """Shapes with a symbolic leading (batch) dimension set to 1, when that is the only dynamic
    one of every input, so MACs can be counted per sample; else {} (MACs unknown)."""
    shapes = {}
    for value in model.graph.inputs:
        if value.name not in dynamic:
            continue
        dims = list(value.shape)
        if any(not isinstance(d, int) for d in dims[1:]):
            return {}
        shapes[value.name] = [1, *dims[1:]]
    return shapes


def _shape(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def print_inspection(info: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .report import float_reasons
    console = Console()
    mb = info["bytes"] / 1e6
    console.print(f"[bold]{info['model']}[/bold]: {mb:.1f} MB, IR {info['ir_version']}, opset {info['opset']}, "
                  f"{info['nodes']} nodes, {info['float_type']}, weights {info['weights_bytes'] / 1e6:.1f} MB"
                  + (f" (external: {', '.join(info['external_data'])})" if info["external_data"] else ""))
    for name, shape in info["inputs"].items():
        console.print(f"  input  {name} {shape}" + ("  [dynamic]" if name in info["dynamic_inputs"] else ""))
    for name, shape in info["outputs"].items():
        console.print(f"  output {name} {shape}")
    if info["decoder"]:
        console.print("  a decoder (KV cache or causal-LM I/O): its dynamic axes stay dynamic on cpu")
    if info["ops_onnxruntime_lacks"]:
        console.print("[yellow]ops onnxruntime cannot run[/yellow] (compile with --custom-ops LIB.so): "
                      + ", ".join(f"{op} x{len(n)}" for op, n in info["ops_onnxruntime_lacks"].items()))
    if info["already_quantized"]:
        console.print(f"already quantized: {info['already_quantized']} layers hold Q/DQ weights "
                      "(compiled without --recipe: lowered as they are)")
    line = f"target {info['target']}, recipe {info['recipe']}"
    if info.get("recipe_choice"):
        line += f" ({info['recipe_choice']})"
    console.print(line)
    layers = info["layers"]
    if not layers:
        return
    at = info.get("macs_at")
    table = Table(title=f"{len(layers)} layers (the graph on disk; canonicalize/fuse may fold or fuse some)"
                  + (f"; MACs at {', '.join(f'{k}:{v}' for k, v in at.items())}" if at else ""))
    for col in ("layer", "op", "weight", "MACs", "plan"):
        table.add_column(col, justify="right" if col == "MACs" else "left")
    for name, e in layers.items():
        table.add_row(escape(name), e["op"], "x".join(map(str, e["weight_shape"])) if e["weight_shape"] else "-",
                      f"{e['macs']:,}" if e["macs"] is not None else "?",
                      escape(e["plan"] if e["plan"] != "float" else f"float: {e['reason']}"))
    console.print(table)
    n_q = sum(1 for e in layers.values() if e["plan"] != "float")
    reasons = float_reasons({k: {"status": "float" if e["plan"] == "float" else "quantized", "reason": e.get("reason")}
                             for k, e in layers.items()})
    console.print(f"{n_q} would be quantized, {len(layers) - n_q} float"
                  + (" (" + ", ".join(f"{n} {k}" for k, n in reasons.items()) + ")" if reasons else ""))
