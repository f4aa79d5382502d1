"""compile_model: the whole flow — load, pipeline, save, verify, report — with
every output staged and committed only on success."""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import shutil
import time
from pathlib import Path

import yaml

from .calib_data import model_input_specs, open_dataset, shapes_from_data
from .context import CompileContext, log
from .errors import DataError, ModelError, QCompileError, UsageError
from .model_io import (convert_opset, dynamic_inputs, file_sha256, fix_input_shapes, infer_shapes,
                       load_model, opset_of, save_model)
from .output import StagedOutput
from .pipeline import run_pipeline
from .recipe import Recipe, load_recipe, parse_steps
from .report import write_report
from .targets import Target, check_capabilities, load_target
from .budget import compile_with_fallback, error_fallback_count
from .verify import verify_models

MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.resolved.yaml"
_VERSIONED = ("qcompile", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "numpy", "ml_dtypes")


@dataclasses.dataclass
class CompileResult:
    output_dir: Path
    files: list[Path]
    report: dict
    stats: dict = dataclasses.field(default_factory=dict, repr=False)  # activation observers


def prepare(target_spec: str, recipe_name: str, exclude_layers: tuple[str, ...] = (),
            overrides: dict[str, dict] | None = None) -> tuple[Target, Recipe]:
    """Target and recipe, fully validated (recipe keys, order, target capabilities).

    `exclude_layers`: node names every quantize step keeps float (the accuracy budget's
    fallback); `overrides`: {pass name: {key: value}} replacing top-level config keys.
    """
    target = load_target(target_spec)
    lowering = parse_steps(list(target.lowering), f"target {target.name}", "target") if target.lowering else []
    recipe = load_recipe(recipe_name, extra_steps=lowering)
    if exclude_layers or overrides:
        recipe = _adjusted(recipe, exclude_layers, overrides or {})
    check_capabilities(target, recipe)
    return target, recipe


def _adjusted(recipe: Recipe, exclude_layers: tuple[str, ...], overrides: dict[str, dict]) -> Recipe:
    steps = []
    for step in recipe.steps:
        config = step.config
        changes = dict(overrides.get(step.spec.name, {}))
        if step.spec.name == "quantize" and exclude_layers:
            changes["exclude"] = tuple(config.exclude) + tuple(glob.escape(n) for n in exclude_layers)
        if changes:
            config = dataclasses.replace(config, **changes)
        steps.append(dataclasses.replace(step, config=config))
    return dataclasses.replace(recipe, steps=tuple(steps))


def compile_model(model_path: str | Path, *, target: str = "cpu", recipe: str = "w8a8",
                  calib: str | Path | None = None, output_dir: str | Path = "out",
                  input_shapes: dict[str, list[int]] | None = None, verify: bool = True,
                  verify_data: str | Path | None = None, verify_samples: int = 64,
                  dump_after: tuple[str, ...] = (), progress: bool = True,
                  external_data: bool | None = None, exclude_layers: tuple[str, ...] = (),
                  overrides: dict[str, dict] | None = None, stats: dict | None = None) -> CompileResult:
    """Compile `model_path` for `target` with `recipe`; outputs land in `output_dir` only on success.

    `external_data`: store weights in `model.onnx.data` (None: only when over 2 GB).
    `exclude_layers` / `overrides`: see `prepare`. `stats`: activation observers from an
    earlier compile of the same model and data (tensor name -> observer); calibration
    then only observes tensors missing from it. The result's `stats` are this compile's.
    """
    started = time.perf_counter()
    model_path = Path(model_path)
    tgt, rec = prepare(target, recipe, exclude_layers, overrides)
    fallback = error_fallback_count(rec)
    if fallback:
        return compile_with_fallback(model_path, count=fallback, output_dir=output_dir, recipe=recipe, target=target,
                                     calib=calib, input_shapes=input_shapes, verify=verify, verify_data=verify_data,
                                     verify_samples=verify_samples, dump_after=dump_after, progress=progress,
                                     external_data=external_data)
    known = {s.spec.name for s in rec.steps}
    unknown = sorted(set(dump_after) - known - {"all"})
    if unknown:
        raise UsageError(f"--dump-after {unknown[0]}: no such pass in this compile",
                         hint=f"passes here: {', '.join(s.spec.name for s in rec.steps)} (or 'all')")
    staged = StagedOutput(output_dir)
    try:
        result = _compile(model_path, tgt, rec, calib, staged, input_shapes or {}, verify, verify_data,
                          verify_samples, set(dump_after), progress, started, external_data, stats)
        files = staged.commit()
        result.files = files
        return result
    except BaseException:
        staged.discard()
        raise


def _compile(model_path, tgt, rec, calib, staged, input_shapes, verify, verify_data, verify_samples,
             dump_after, progress, started, external_data, stats=None) -> CompileResult:
    model = load_model(model_path)
    original_opset = opset_of(model)
    needed = required_opset(tgt, rec)
    if original_opset < needed:
        log.info("converting opset %d -> %d (needed: %d)", original_opset, tgt.opset_convert_to, needed)
        model = convert_opset(model, tgt.opset_convert_to)
    specs = model_input_specs(model)
    dataset = open_dataset(calib, specs) if calib is not None else None
    keep_dynamic = any(step.spec.cls.keeps_dynamic_shapes(step.config) for step in rec.steps)
    if not input_shapes and dataset is not None and dynamic_inputs(model) and not keep_dynamic:
        input_shapes = shapes_from_data(dataset)
    if input_shapes:
        fix_input_shapes(model, input_shapes)
    else:
        infer_shapes(model)
    ctx = CompileContext(target=tgt, calib=dataset, progress=progress)
    if stats:
        ctx.stats.update(stats)
    still_dynamic = dynamic_inputs(model)
    needs_ranges = any(s.spec.cls.gives(s.config) & {"ranges"} for s in rec.steps)
    if still_dynamic and needs_ranges and dataset is None:
        raise UsageError(f"inputs {sorted(still_dynamic)} have dynamic dimensions and no calibration data "
                         "fixes them", hint="pass --input-shape NAME:D,D,... (or --calib data)")
    model = run_pipeline(model, rec, ctx, dump_after=dump_after, dump_dir=staged.path("dumps"))
    out_model = staged.path(MODEL_FILE)
    save_model(model, out_model, external_data=external_data)
    for name, write in sorted(ctx.artifacts.items()):
        write(staged.path(name))

    report = {
        "model": str(model_path), "target": tgt.name, "target_variant": tgt.variant, "recipe": rec.name,
        "opset": {"input": original_opset, "output": opset_of(model)},
        "input_shapes": {k: list(v) for k, v in input_shapes.items()},
    }
    exported = {k: v for k, v in model.metadata_props.items() if k.startswith("qcompile.export.")}
    if exported:  # how models/export_hf.py made it, e.g. random weights
        report["model_export"] = exported
    resolved = rec.to_dict()
    resolved["target"] = {"name": tgt.name, "variant": tgt.variant, "lowering": rec.target_steps()}
    resolved["provenance"] = {
        "model_sha256": file_sha256(model_path),
        "calibration_sha256": dataset.sha256() if dataset is not None else None,
        "input_shapes": report["input_shapes"],
        "versions": {p: _version(p) for p in _VERSIONED},
    }
    staged.path(RECIPE_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))

    if verify:
        # the original inputs: a pass may have made some integer (kv_cache); verify encodes them
        vdata = _verification_data(verify_data, dataset, specs, ctx)
        layers = {name: rec_ for name, rec_ in ctx.layers.items() if rec_.get("status") == "quantized"}
        layer_tensors = {n: {"input": r.get("input_tensor"), "output": r["output_tensor"]}
                         for n, r in layers.items() if r.get("output_tensor")}
        checked = out_model
        if ctx.reference_model is not None:  # the shipped graph uses target ops: check its reference lowering
            checked = staged.path(".reference") / MODEL_FILE
            checked.parent.mkdir()
            save_model(ctx.reference_model, checked)
        try:
            report["verification"] = verify_models(model_path, checked, vdata, samples=verify_samples,
                                                   layers=layer_tensors, rescaled=ctx.rescaled, progress=progress)
            report["verification"]["checked"] = "reference lowering of model.onnx" \
                if checked != out_model else "model.onnx"
        except DataError:
            raise
        except Exception as err:
            raise ModelError(f"verification could not run the models in onnxruntime: {err}") from None
        finally:
            if checked != out_model:
                shutil.rmtree(checked.parent, ignore_errors=True)
        for name, entry in report["verification"].get("layers", {}).items():
            ctx.layers[name]["error"] = entry
    report["layers"] = ctx.layers
    report["warnings"] = ctx.warnings
    report.update({k: v for k, v in ctx.report.items()})
    report["compile_seconds"] = round(time.perf_counter() - started, 3)
    write_report(staged.path(REPORT_FILE), report)
    return CompileResult(staged.destination, [], report, ctx.stats)


def required_opset(tgt: Target, rec: Recipe) -> int:
    """The target's minimum, raised by what the passes emit (FP8 Q/DQ: 19, int4/blocks: 21)."""
    need = tgt.opset_min
    for step in rec.steps:
        min_opset = getattr(step.spec.cls, "min_opset", None)
        if min_opset is not None:
            need = max(need, min_opset(step.config, tgt))
    return need


def _verification_data(verify_data, dataset, specs, ctx):
    if verify_data is not None:
        return open_dataset(verify_data, specs)
    if dataset is not None:
        ctx.warn("no --verify-data: verifying on the calibration data (not held out); "
                 "numbers will look better than on unseen inputs")
        return dataset
    ctx.warn("no data: verifying on synthetic inputs")
    return open_dataset(None, specs, synthetic_samples=4, seed=1)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["compile_model", "prepare", "CompileResult", "QCompileError"]
