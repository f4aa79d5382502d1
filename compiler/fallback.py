"""Fixed fallback by measured error: `quantize: {fallback: {max_layers: N, rank_by: error}}`.

Compile and verify once with the recipe's fallback off, rank the quantized layers by the noise
each adds (verification's `added_sqnr_db`), then compile again with the N noisiest kept float
on top of whatever the plan already keeps float; the second compile is the result, reusing
the first one's calibration. `compile_plan` is what every strategy calls to compile a plan:
it takes this path when the recipe asks for it, else compiles once.
"""

from __future__ import annotations

from pathlib import Path

from qcompile.passes.quantize import Fallback

from .compile import CompileResult, compile_once
from .errors import UsageError
from .layers import LayerTable
from .output import keep_only
from .plan import CompilePlan


def error_fallback_count(recipe) -> int:
    """`quantize.fallback.max_layers` when ranked by measured error (0: none asked)."""
    for step in recipe.steps:
        fb = getattr(step.config, "fallback", None) if step.spec.name == "quantize" else None
        if fb is not None and fb.rank_by == "error" and fb.max_layers:
            return fb.max_layers
    return 0


def ranked_layers(layers: LayerTable) -> list[str]:
    """Quantized layers, noisiest first: lowest added SQNR (the noise this layer adds), then
    lowest output SQNR where the added figure is missing."""
    rows = []
    for record in layers.quantized():
        err = record.error
        added = err.added_sqnr_db if err is not None else None
        total = err.sqnr_db if err is not None else None
        key = added if isinstance(added, (int, float)) else total if isinstance(total, (int, float)) else float("inf")
        rows.append((key, record.name))
    return [name for _, name in sorted(rows)]


def compile_plan(plan: CompilePlan, folder: Path) -> CompileResult:
    """Compile `plan` into `folder`: through the error-ranked fallback when its recipe asks for one."""
    count = error_fallback_count(plan.recipe)
    return compile_with_fallback(plan, folder, count) if count else compile_once(plan, folder)


def compile_with_fallback(plan: CompilePlan, folder: Path, count: int) -> CompileResult:
    if not plan.verify.enabled:
        raise UsageError("quantize.fallback.rank_by: error ranks layers by verification; drop --no-verify "
                         "(or use rank_by: range)")
    off = plan.adjusted(overrides={"quantize": {"fallback": Fallback()}})   # the pass's own default: off
    first = compile_once(off, folder / "first")
    worst = ranked_layers(first.layers)[:count]
    final = off.adjusted(exclude=tuple(worst), reuse=first.stats.observers())
    result = compile_once(final, folder / "final")
    keep_only(folder, folder / "final")
    result.folder = folder
    for name in worst:
        result.layers[name].reason = "fallback: among the layers adding the most noise when quantized"
    result.strategy["fallback"] = {"rank_by": "error", "max_layers": count, "layers": worst,
                                   "sqnr_db_before": first.worst_output("sqnr_db"),
                                   "sqnr_db_after": result.worst_output("sqnr_db")}
    return result
