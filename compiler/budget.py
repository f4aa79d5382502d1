"""The accuracy budget: compile, verify, and fall layers back to float (or change the
calibration method) until a metric holds — always returning the best model found.

`--max-loss "cosine>=0.995"` (or `sqnr>=30`) turns one compile into a search:

1. trial 0 is the recipe as written;
2. if the recipe calibrates, the other range methods are tried (each a trial), and the best
   one is kept for what follows;
3. then the quantized layers that add the most noise (verification's per-layer
   `added_sqnr_db`, lowest first) are kept float, 1, 3, 7, … at a time until the metric
   holds, then bisected back down to the fewest that still hold it — or until the trial
   budget is spent.

Every trial is a full compile into a scratch folder; the best (the first that meets the
budget, else the highest metric) is moved to the output, and `report.json → budget` lists
every trial. Calibration statistics are reused across trials (the float model and data are
the same), so a trial costs the quantize, lowering and verification passes.
The metric is read on the verification data (`--verify-data`, else the calibration data);
choose held-out data you can afford to tune on.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

from .context import log
from .errors import QCompileError, UsageError
from .output import StagedOutput

METRICS = {"cosine": "cosine_mean", "sqnr": "sqnr_db"}
_RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str        # a METRICS key
    threshold: float

    def value(self, report: dict) -> float | None:
        """The metric over all outputs (their worst), or None when verification did not run."""
        outputs = (report.get("verification") or {}).get("outputs") or {}
        values = [o.get(METRICS[self.metric]) for o in outputs.values()]
        values = [float(v) for v in values if isinstance(v, (int, float))]
        return min(values) if values else None

    def met(self, value: float | None) -> bool:
        return value is not None and value >= self.threshold

    def __str__(self) -> str:
        return f"{self.metric}>={self.threshold:g}"


def parse_budget(text: str) -> Budget:
    """`cosine>=0.995` or `sqnr>=30` (dB); the metric is the worst over the model's outputs."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*>=\s*([-+0-9.eE]+)\s*", text or "")
    if not m:
        raise UsageError(f"--max-loss {text!r} is not METRIC>=VALUE",
                         hint=f"e.g. --max-loss cosine>=0.995 or --max-loss sqnr>=30; metrics: {', '.join(METRICS)}")
    name, value = m.group(1), m.group(2)
    if name not in METRICS:
        raise UsageError(f"--max-loss: unknown metric {name!r}", hint=f"metrics: {', '.join(METRICS)}")
    try:
        threshold = float(value)
    except ValueError:
        raise UsageError(f"--max-loss: {value!r} is not a number") from None
    if name == "cosine" and not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--max-loss: a cosine threshold is in [-1, 1], got {threshold}")
    return Budget(name, threshold)


@dataclasses.dataclass
class Trial:
    index: int
    change: str
    excluded: tuple[str, ...]
    overrides: dict
    value: float | None = None
    seconds: float = 0.0
    quantized: int = 0
    error: str | None = None
    folder: Path | None = None

    def to_json(self) -> dict:
        return {"trial": self.index, "change": self.change, "metric": self.value, "excluded": list(self.excluded),
                "overrides": self.overrides, "quantized_layers": self.quantized, "seconds": round(self.seconds, 2),
                **({"error": self.error} if self.error else {})}


def compile_with_budget(model_path, *, budget: Budget, max_trials: int = 8, output_dir="out", recipe: str = "w8a8",
                        **compile_args):
    """Search (see the module docstring) and return the best trial's CompileResult in `output_dir`."""
    from .compile import compile_model, prepare
    from .report import write_report

    if max_trials < 1:
        raise UsageError(f"--max-trials must be at least 1, got {max_trials}")
    if compile_args.get("verify") is False:
        raise UsageError("--max-loss needs verification", hint="drop --no-verify")
    _, rec = prepare(compile_args.get("target", "cpu"), recipe)  # validate before any work
    calibrates = any(s.spec.name == "calibrate" for s in rec.steps)
    base_method = next((s.config.method for s in rec.steps if s.spec.name == "calibrate"), None)
    out = StagedOutput(output_dir)  # fails now if the output cannot be written
    scratch = out.path("trials")
    trials: list[Trial] = []
    stats = None
    best: tuple[Trial, object] | None = None

    def run(trial: Trial):
        nonlocal stats, best
        trial.folder = scratch / f"{trial.index:02d}"
        started = time.perf_counter()
        try:
            result = compile_model(model_path, recipe=recipe, output_dir=trial.folder, exclude_layers=trial.excluded,
                                   overrides=trial.overrides or None, stats=stats, **compile_args)
        except QCompileError as err:
            if not trials:
                raise  # the recipe as written does not compile: that is the user's error to see
            trial.error = str(err)
            trials.append(trial)
            return None
        trial.seconds = time.perf_counter() - started
        trial.value = budget.value(result.report)
        trial.quantized = sum(1 for r in result.report.get("layers", {}).values() if r.get("status") == "quantized")
        stats = stats or result.stats
        trials.append(trial)
        log.info("budget trial %d (%s): %s = %s", trial.index, trial.change, budget.metric, trial.value)
        if best is None or _better(trial, best[0], budget):
            best = (trial, result)
        return result

    try:
        first = run(Trial(0, "recipe as written", (), {}))
        method_overrides: dict = {}
        if calibrates:
            for method in _RANGE_METHODS:
                if budget.met(best[0].value) or len(trials) >= max_trials:
                    break
                if method == base_method:
                    continue
                run(Trial(len(trials), f"calibrate.method = {method}", (), {"calibrate": {"method": method}}))
            method_overrides = dict(best[0].overrides)
        ranking = _ranked_layers(best[1].report if best else first.report)

        def fall_back(count: int) -> bool:
            trial = Trial(len(trials), f"{count} noisiest layers kept float", tuple(ranking[:count]), method_overrides)
            run(trial)
            return budget.met(trial.value)

        # grow the fallback in doubling steps until the budget holds, then bisect back down
        failing, meeting, step = 0, None, 1
        while meeting is None and len(trials) < max_trials and failing < len(ranking) \
                and not budget.met(best[0].value):
            count = min(failing + step, len(ranking))
            if fall_back(count):
                meeting = count
            else:
                failing, step = count, step * 2
        while meeting is not None and meeting - failing > 1 and len(trials) < max_trials:
            mid = (failing + meeting) // 2
            if fall_back(mid):
                meeting = mid
            else:
                failing = mid
        winner, result = best
        final = Path(output_dir)
        out.keep_only(winner.folder)
        report = result.report
        report["budget"] = {"metric": budget.metric, "threshold": budget.threshold, "met": budget.met(winner.value),
                            "best_trial": winner.index, "value": winner.value,
                            "judged_on": "verification data", "trials": [t.to_json() for t in trials]}
        if not budget.met(winner.value):
            msg = (f"accuracy budget {budget} not met in {len(trials)} trials; the best ({budget.metric} = "
                   f"{winner.value}) is in {final}")
            report.setdefault("warnings", []).append(msg)
            log.warning(msg)
        write_report(out.path("report.json"), report)
        files = out.commit()
        result.output_dir, result.files, result.report = final, files, report
        return result
    except BaseException:
        out.discard()
        raise


def _better(a: Trial, b: Trial, budget: Budget) -> bool:
    """Meeting the budget with more layers quantized beats everything; else the higher metric."""
    if a.value is None:
        return False
    if b.value is None:
        return True
    if budget.met(a.value) and budget.met(b.value):
        return a.quantized > b.quantized
    return a.value > b.value


def _ranked_layers(report: dict) -> list[str]:
    """Quantized layers, noisiest first: lowest added SQNR (the noise this layer adds), then
    lowest output SQNR where the added figure is missing."""
    rows = []
    for name, rec in report.get("layers", {}).items():
        if rec.get("status") != "quantized":
            continue
        err = rec.get("error") or {}
        added, total = err.get("added_sqnr_db"), err.get("sqnr_db")
        key = added if isinstance(added, (int, float)) else total if isinstance(total, (int, float)) else float("inf")
        rows.append((key, name))
    return [name for _, name in sorted(rows)]


def error_fallback_count(recipe) -> int:
    """`quantize.fallback.max_layers` when ranked by measured error (0: none asked)."""
    for step in recipe.steps:
        fb = getattr(step.config, "fallback", None) if step.spec.name == "quantize" else None
        if fb is not None and fb.rank_by == "error" and fb.max_layers:
            return fb.max_layers
    return 0


def compile_with_fallback(model_path, *, count: int, output_dir="out", recipe: str = "w8a8", **compile_args):
    """`fallback: {max_layers: N, rank_by: error}`: compile and verify once, then compile again
    with the N layers that added the most noise kept float; the second is the result."""
    from qcompile.passes.quantize import Fallback

    from .compile import compile_model
    from .report import write_report

    if compile_args.get("verify") is False:
        raise UsageError("quantize.fallback.rank_by: error ranks layers by verification; drop --no-verify "
                         "(or use rank_by: range)")
    off = {"quantize": {"fallback": Fallback()}}
    out = StagedOutput(output_dir)
    try:
        first = compile_model(model_path, recipe=recipe, output_dir=out.path("first"), overrides=off, **compile_args)
        worst = _ranked_layers(first.report)[:count]
        result = compile_model(model_path, recipe=recipe, output_dir=out.path("final"), overrides=off,
                               exclude_layers=tuple(worst), stats=first.stats, **compile_args)
        out.keep_only(out.path("final"))
        report = result.report
        first_budget = Budget("sqnr", float("inf"))
        report["fallback"] = {"rank_by": "error", "max_layers": count, "layers": worst,
                              "sqnr_db_before": first_budget.value(first.report),
                              "sqnr_db_after": first_budget.value(report)}
        for name in worst:
            report["layers"][name]["reason"] = "fallback: among the layers adding the most noise when quantized"
        write_report(out.path("report.json"), report)
        result.files, result.output_dir = out.commit(), Path(output_dir)
        return result
    except BaseException:
        out.discard()
        raise
