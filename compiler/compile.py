"""One compile: load, pipeline, save, verify — into a folder, returning structured results.

`compile_once(plan, folder)` writes `model.onnx` (+ `.data`), `recipe.resolved.yaml` and the
target's artifacts into `folder` and returns a `CompileResult`: the layer table, each pass's
report section, timings, warnings, verification numbers and the activation statistics. It
writes no report: the driver (compiler/driver.py) renders report.json once, at commit, after
any search strategy (fallback, budget, mixed precision) has added its own section.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from .analyses import ActivationStats
from .calib_data import Dataset, model_input_specs, open_dataset, shapes_from_data
from .errors import DataError, ModelError, UsageError
from .facts import Fact
from .float16 import narrow_io, widen
from .hostinfo import PhaseMeter
from .layers import LayerError, LayerTable
from .layerwise import partition_for
from .memory_plan import MemoryPlan
from .model_io import (convert_opset, dynamic_inputs, file_sha256, fix_input_shapes, infer_shapes, load_model,
                       opset_of, save_model)
from .model_kind import is_decoder
from .op_support import refuse_unknown_ops
from .ort_session import generated_kernel_scope
from .pass_context import PassContext, Warnings, log
from .pipeline import DumpAfter, PassTiming, run_pipeline
from .plan import CompilePlan
from .recipe import Recipe
from .targets import Target
from .verify import verify_models
from .verify_blockwise import verify_blockwise
from .weight_store import weight_spill
from .versions import package_version

MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.resolved.yaml"
SCRATCH_DIR = ".scratch"   # --max-memory's activation cache and spilled weights, removed before commit
_VERSIONED = ("qcompile", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "numpy", "ml_dtypes")


@dataclasses.dataclass
class CompileResult:
    plan: CompilePlan
    folder: Path                          # where this compile's files are (staged until committed)
    header: dict                          # model, target, recipe, opset, input shapes (report.json's head)
    layers: LayerTable
    sections: dict                        # each pass's report section, in the order they were written
    timings: list[dict]
    warnings: Warnings
    verification: dict | None
    stats: ActivationStats
    seconds: float
    strategy: dict = dataclasses.field(default_factory=dict)   # a search strategy's sections (budget, ...)
    phases: dict = dataclasses.field(default_factory=dict)     # load / write / verify: seconds, peak RSS
    # set at commit (compiler/driver.py)
    output_dir: Path | None = None
    files: list[Path] = dataclasses.field(default_factory=list)
    report: dict = dataclasses.field(default_factory=dict)

    def worst_output(self, key: str) -> float | None:
        """The worst of a verification metric (`sqnr_db`, `cosine_mean`) over the outputs."""
        outputs = (self.verification or {}).get("outputs") or {}
        values = [o.get(key) for o in outputs.values()]
        values = [float(v) for v in values if isinstance(v, (int, float))]
        return min(values) if values else None


def compile_once(plan: CompilePlan, folder: Path) -> CompileResult:
    """Run `plan` once, writing its files into `folder` (created)."""
    spill = folder / SCRATCH_DIR / "weights" if plan.max_memory is not None else None
    # a kernel library the lowering builds serves this compile's sessions; under --max-memory
    # rewritten weights go to the scratch folder until model.onnx is written
    with generated_kernel_scope(), weight_spill(spill):
        try:
            return _compile_once(plan, folder)
        finally:
            shutil.rmtree(folder / SCRATCH_DIR, ignore_errors=True)


def _compile_once(plan: CompilePlan, folder: Path) -> CompileResult:
    started = time.perf_counter()
    phases = {}
    meter = PhaseMeter()
    folder.mkdir(parents=True, exist_ok=True)
    tgt, rec = plan.target, plan.recipe
    model = load_model(plan.model)
    for step in rec.steps:             # refusals that need the model, before any other work
        step.spec.cls.check_model(step.config, model)
    needs_ranges = any(Fact.RANGES in s.spec.cls.gives(s.config) for s in rec.steps)
    if plan.verify.enabled or needs_ranges or plan.calib is not None:   # the model will run in onnxruntime
        refuse_unknown_ops(model, plan.model, plan.custom_ops)
    original_opset = opset_of(model)
    needed = required_opset(tgt, rec, model)
    if original_opset < needed:
        log.info("converting opset %d -> %d (needed: %d)", original_opset, tgt.opset_convert_to, needed)
        model = convert_opset(model, tgt.opset_convert_to)
    specs = model_input_specs(model)   # the original's inputs: data is checked against these
    dataset = open_dataset(plan.calib, specs) if plan.calib is not None else None
    half = widen(model)                # a float16/bfloat16 model compiles in float32 inside
    input_shapes = dict(plan.input_shapes)
    keep_dynamic = keeps_dynamic_shapes(model, tgt, rec)
    if not input_shapes and dataset is not None and dynamic_inputs(model) and not keep_dynamic:
        input_shapes = shapes_from_data(dataset)
    if input_shapes:
        fix_input_shapes(model, input_shapes)
        specs = [dataclasses.replace(s, shape=tuple(input_shapes[s.name])) if s.name in input_shapes else s
                 for s in specs]  # verification (synthetic inputs included) runs the pinned shapes
    else:
        infer_shapes(model)
    widened = {s.name: np.dtype(np.float32) for s in specs if half and s.name in half.inputs}
    memory = MemoryPlan(plan.max_memory, folder / SCRATCH_DIR) if plan.max_memory is not None else None
    ctx = PassContext(target=tgt, data=dataset.cast_to(widened) if dataset is not None and widened else dataset,
                      progress=plan.progress, stats=ActivationStats(plan.reuse), memory=memory,
                      sharding=plan.sharding)
    if plan.sharding.sharded:
        ctx.reports["sharding"] = plan.sharding.describe()
    if memory is not None:   # a first partition: a bound too small for one block is refused before any work
        ctx.reports["memory"] = {**memory.describe(), **partition_for(model, memory).describe()}
    still_dynamic = dynamic_inputs(model)
    if still_dynamic and needs_ranges and dataset is None:
        raise UsageError(f"inputs {sorted(still_dynamic)} have dynamic dimensions and no calibration data "
                         "fixes them", hint="pass --input-shape NAME:D,D,... (or --calib data)")
    phases["load"] = meter.done()
    timing = PassTiming()
    model = run_pipeline(model, rec, ctx, [timing, DumpAfter(plan.dump_after, folder / "dumps")])
    if half is not None:
        for graph in (model, ctx.outputs.reference_model, *(c.model for c in ctx.outputs.companions.values())):
            if graph is not None:
                narrow_io(graph, half)
        ctx.reports["half_precision"] = half.describe()
    out_model = folder / MODEL_FILE
    # under --max-memory the weights go to model.onnx.data tensor by tensor, and verification
    # reads them from there block by block
    external = True if plan.external_data is None and memory is not None else plan.external_data
    log.info("writing %s", out_model.name)
    meter = PhaseMeter()
    save_model(model, out_model, external_data=external)
    for name, companion in sorted(ctx.outputs.companions.items()):
        save_model(companion.model, folder / name, external_data=external)
    for name, write in sorted(ctx.outputs.artifacts.items()):
        write(folder / name)

    header = {"model": str(plan.model), "target": tgt.name, "target_variant": tgt.variant, "recipe": rec.name,
              "opset": {"input": original_opset, "output": opset_of(model)},
              "input_shapes": {k: list(v) for k, v in input_shapes.items()}}
    if plan.recipe_choice:
        header["recipe_choice"] = plan.recipe_choice
    exported = {k: v for k, v in model.metadata_props.items() if k.startswith("qcompile.export.")}
    if exported:  # how models/export_hf.py made it, e.g. random weights
        header["model_export"] = exported
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(_resolved(plan, rec, dataset, header), sort_keys=False))

    phases["write"] = meter.done()
    verification = None
    if plan.verify.enabled:
        meter = PhaseMeter()
        verification = _verify(plan, dataset, specs, ctx, folder, out_model)
        phases["verify"] = meter.done()
    return CompileResult(plan=plan, folder=folder, header=header, layers=ctx.layers, sections=ctx.reports,
                         timings=timing.records, warnings=ctx.warnings, verification=verification,
                         stats=ctx.stats, seconds=time.perf_counter() - started, phases=phases)


def _resolved(plan: CompilePlan, rec: Recipe, dataset: Dataset | None, header: dict) -> dict:
    """recipe.resolved.yaml: the steps with every default, the target's lowering, provenance."""
    resolved = rec.to_dict()
    resolved["target"] = {"name": plan.target.name, "variant": plan.target.variant, "lowering": rec.target_steps()}
    resolved["provenance"] = {
        "model_sha256": file_sha256(plan.model),
        "calibration_sha256": dataset.sha256() if dataset is not None else None,
        "input_shapes": header["input_shapes"],
        "versions": {p: package_version(p) for p in _VERSIONED},
    }
    return resolved


def _verify(plan: CompilePlan, dataset, specs, ctx: PassContext, folder: Path, out_model: Path) -> dict:
    """Original vs the compiled graph (or its reference lowering, when it uses target ops) on the
    verification data; each quantized layer's error lands in its record."""
    # the original inputs: a pass may have made some integer (kv_cache); verify encodes them
    vdata = _verification_data(plan.verify.data, dataset, specs, ctx)
    tensors = {r.name: {"input": r.input_tensor, "output": r.output_tensor}
               for r in ctx.layers.quantized() if r.output_tensor}
    checked = out_model
    if ctx.outputs.reference_model is not None:  # the shipped graph uses target ops: check its reference lowering
        checked = folder / ".reference" / MODEL_FILE
        checked.parent.mkdir()
        save_model(ctx.outputs.reference_model, checked, external_data=True if ctx.memory is not None else None)
    try:
        log.info("verifying %s against %s", checked.name, plan.model.name)
        result = _verify_pair(plan.model, checked, vdata, ctx.memory, samples=plan.verify.samples, layers=tensors,
                              rescales=ctx.rescales, progress=plan.progress)
        result["checked"] = "reference lowering of model.onnx" if checked != out_model else "model.onnx"
    except DataError:
        raise
    except Exception as err:
        raise ModelError(f"verification could not run the models in onnxruntime: {err}") from None
    finally:
        if checked != out_model:
            shutil.rmtree(checked.parent, ignore_errors=True)
    for name, entry in result.get("layers", {}).items():
        ctx.layers[name].error = LayerError(entry["tensor"], entry["sqnr_db"], entry.get("added_sqnr_db"))
    companions = {name: _verify_companion(plan, vdata, folder / name, companion, ctx.rescales, ctx.memory)
                  for name, companion in sorted(ctx.outputs.companions.items())}
    if companions:
        result["companions"] = companions
    return result


def _verify_pair(original: Path, compiled: Path, vdata, memory: MemoryPlan | None, **options) -> dict:
    """verify_models, or its block-by-block twin under --max-memory (the same numbers)."""
    if memory is not None:
        return verify_blockwise(original, compiled, vdata, memory=memory, **options)
    return verify_models(original, compiled, vdata, **options)


def _verify_companion(plan: CompilePlan, vdata, path: Path, companion, rescales, memory) -> dict:
    """A second shipped graph (model.kernels.onnx) against the original: its outputs' errors, or
    why it could not run here. Its custom nodes run through `companion.reference_library`,
    which the lowering registered for every session of this compile."""
    if companion.reference_library is None:
        return {"checked": None, "reason": "no library here runs its custom nodes (see the warnings)"}
    try:
        found = _verify_pair(plan.model, path, vdata, memory, samples=plan.verify.samples, rescales=rescales,
                             progress=plan.progress)
    except Exception as err:     # the companion's failure must not hide model.onnx's verification
        return {"checked": None, "reason": f"onnxruntime could not run it: {err}"}
    return {"checked": companion.what, **{k: v for k, v in found.items() if k in ("outputs", "task", "samples")}}


def keeps_dynamic_shapes(model, tgt: Target, rec: Recipe) -> bool:
    """Whether the compile leaves dynamic input dimensions dynamic instead of pinning them from
    the first calibration sample: a pass asks for it (kv_cache), or the model is a decoder
    (KV cache or causal-LM I/O: it must still decode, whatever length it was calibrated on)
    and the target runs dynamic shapes (its descriptor's `static_shapes`)."""
    if any(step.spec.cls.keeps_dynamic_shapes(step.config) for step in rec.steps):
        return True
    return not tgt.setting("static_shapes", False) and is_decoder(model)


def required_opset(tgt: Target, rec: Recipe, model=None) -> int:
    """The target's minimum, raised by what the passes emit (FP8 Q/DQ: 19, int4/blocks: 21) or
    match (fusion patterns: 18, where the model has something to fuse)."""
    need = tgt.opset_min
    for step in rec.steps:
        need = max(need, step.spec.cls.min_opset(step.config, tgt, model))
    return need


def _verification_data(verify_data, dataset, specs, ctx: PassContext):
    if verify_data is not None:
        return open_dataset(verify_data, specs)
    if dataset is not None:
        ctx.warn("no --verify-data: verifying on the calibration data (not held out); "
                 "numbers will look better than on unseen inputs")
        return dataset
    ctx.warn("no data: verifying on synthetic inputs")
    return open_dataset(None, specs, synthetic_samples=4, seed=1)
