"""Runs a recipe's passes in order over one model, with timings and dumps."""

from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir

from .context import CompileContext, log
from .model_io import save_model
from .recipe import Recipe


def run_pipeline(model: ir.Model, recipe: Recipe, ctx: CompileContext, *,
                 dump_after: set[str] = frozenset(), dump_dir: Path | None = None) -> ir.Model:
    timings = []
    for index, step in enumerate(recipe.steps):
        if step.spec.cls.gives(step.config) & {"ranges"}:
            ctx.range_requests = _range_requests(model, recipe, index, ctx)
        start = time.perf_counter()
        log.info("pass %s", step.spec.name)
        result = step.spec.cls(step.config, ctx)(model)
        model = result.model
        timings.append({"pass": step.spec.name, "seconds": round(time.perf_counter() - start, 3),
                        "modified": bool(result.modified)})
        if dump_dir is not None and (step.spec.name in dump_after or "all" in dump_after):
            dump_dir.mkdir(parents=True, exist_ok=True)
            save_model(model, dump_dir / f"{index:02d}-{step.spec.name}.onnx")
    ctx.report["passes"] = timings
    return model


def _range_requests(model: ir.Model, recipe: Recipe, index: int, ctx: CompileContext) -> set[str]:
    """Tensors that the passes after `index` will want activation ranges for."""
    wanted: set[str] = set()
    for step in recipe.steps[index + 1:]:
        request = getattr(step.spec.cls, "range_request", None)
        if request is not None:
            wanted |= request(model, step.config, ctx)
    return wanted
