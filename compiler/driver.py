"""The entry points: a plan, the strategy that compiles it, and one commit.

`compile_model` (the library API and the CLI's plain compile), `compile_with_budget`
(`--max-loss`) and `compile_with_size_budget` (`--max-size`) each prepare a validated plan,
stage the output directory, run a strategy (compiler/fallback.py, budget.py,
mixed_precision.py — all of which compile through compiler/compile.py), then render
report.json once and move the staged files into place. A failure anywhere leaves nothing.
"""

from __future__ import annotations

from pathlib import Path

from . import budget as budget_search
from . import mixed_precision
from .compile import REPORT_FILE, CompileResult
from .fallback import compile_plan
from .ort_session import custom_op_libraries
from .output import StagedOutput
from .plan import prepare_plan
from .report import render, write_report
from .report_html import REPORT_HTML, write_html
from .sharding import Sharding


def _staged(plan, output_dir, run) -> CompileResult:
    """Stage `output_dir`, run the strategy into it, render report.json once, commit."""
    staged = StagedOutput(output_dir)  # fails now if the output cannot be written
    try:
        with custom_op_libraries(plan.custom_ops):
            result = run(staged)
        result.report = render(result)
        write_report(staged.path(REPORT_FILE), result.report)
        write_html(staged.path(REPORT_HTML), result.report)
        result.files = staged.commit()
        result.output_dir, result.folder = staged.destination, staged.destination
        return result
    except BaseException:
        staged.discard()
        raise


def compile_model(model_path: str | Path, *, target: str = "cpu", recipe: str | None = None,
                  calib: str | Path | None = None, output_dir: str | Path = "out",
                  input_shapes: dict[str, list[int]] | None = None, verify: bool = True,
                  verify_data: str | Path | None = None, verify_samples: int = 64,
                  dump_after: tuple[str, ...] = (), progress: bool = True,
                  external_data: bool | None = None, exclude_layers: tuple[str, ...] = (),
                  overrides: dict[str, dict] | None = None, stats: dict | None = None,
                  custom_ops: tuple[str, ...] = (), settings: tuple[str, ...] = (),
                  max_memory: int | None = None, sharding: Sharding = Sharding()) -> CompileResult:
    """Compile `model_path` for `target` with `recipe`; outputs land in `output_dir` only on success.

    `recipe` None: chosen from the model (compiler/recipe_choice.py: `prequantized` for a model
    that is already quantized, else `w8a8`), and the report says why.

    `external_data`: store weights in `model.onnx.data` (None: only when over 2 GB).
    `exclude_layers`: node names every quantize step keeps float; `overrides`: {pass name:
    {key: value}} replacing top-level config keys; `stats`: activation observers from an
    earlier compile of the same model and data (tensor name -> observer, or that compile's
    `result.stats`): calibration then only observes tensors missing from it. `custom_ops`:
    onnxruntime custom-op libraries for ops of the model onnxruntime lacks; `settings`:
    `PASS.KEY=VALUE` recipe overrides as the CLI's `--set` takes them. `max_memory` (bytes):
    the layer-wise compile under that bound (compiler/memory_plan.py). `sharding`: calibration
    statistics computed by forked worker processes or Ray tasks (compiler/sharding.py).
    """
    plan = prepare_plan(model_path, target=target, recipe=recipe, calib=calib, input_shapes=input_shapes,
                        verify=verify, verify_data=verify_data, verify_samples=verify_samples, dump_after=dump_after,
                        progress=progress, external_data=external_data, exclude_layers=exclude_layers,
                        overrides=overrides, stats=stats, custom_ops=custom_ops,
                        settings=settings, max_memory=max_memory,
                        sharding=sharding)
    return _staged(plan, output_dir, lambda staged: compile_plan(plan, staged.staging))


def compile_with_budget(model_path, *, budget: budget_search.Budget, max_trials: int = 8, output_dir="out",
                        recipe: str | None = None, **compile_args) -> CompileResult:
    """`--max-loss`: the accuracy-budget search (compiler/budget.py); the best trial is the output."""
    plan = prepare_plan(model_path, recipe=recipe, **compile_args)
    return _staged(plan, output_dir, lambda staged: budget_search.search(plan, staged.staging, budget, max_trials,
                                                                   destination=staged.destination))


def compile_with_size_budget(model_path, *, max_size_mb: float, low: str = "w4a16", high: str = "w8a16",
                             output_dir="out", **compile_args) -> CompileResult:
    """`--max-size`: per-layer mixed precision within a weight-size budget (compiler/mixed_precision.py)."""
    plan = prepare_plan(model_path, recipe=low, **compile_args)
    return _staged(plan, output_dir, lambda staged: mixed_precision.search(plan, staged.staging, max_size_mb=max_size_mb,
                                                                     low=low, high=high))
