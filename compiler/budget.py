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

Every trial compiles a variant of the plan (`CompilePlan.adjusted`) into a scratch folder
(through compiler/fallback.py, so a recipe's own error-ranked fallback applies within each
trial); the best (the first that meets the budget, else the highest metric) becomes the
output, with `budget` in its report listing every trial. Calibration statistics are reused
across trials (the float model and data are the same), so a trial costs the quantize,
lowering and verification passes. The metric is read on the verification data
(`--verify-data`, else the calibration data); choose held-out data you can afford to tune on.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

from .compile import CompileResult
from .errors import QCompileError, UsageError
from .fallback import compile_plan, ranked_layers
from .layers import LayerStatus
from .output import keep_only
from .pass_context import log
from .plan import CompilePlan

METRICS = {"cosine": "cosine_mean", "sqnr": "sqnr_db"}
_RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str        # a METRICS key
    threshold: float

    def value(self, result: CompileResult) -> float | None:
        """The metric over all outputs (their worst), or None when verification did not run."""
        return result.worst_output(METRICS[self.metric])

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


def search(plan: CompilePlan, folder: Path, budget: Budget, max_trials: int = 8,
           destination: Path | None = None) -> CompileResult:
    """The search of the module docstring; the winner's files end up in `folder` (staged for
    `destination`, which the report names)."""
    if max_trials < 1:
        raise UsageError(f"--max-trials must be at least 1, got {max_trials}")
    if not plan.verify.enabled:
        raise UsageError("--max-loss needs verification", hint="drop --no-verify")
    calibrate = next((s for s in plan.recipe.steps if s.spec.name == "calibrate"), None)
    scratch = folder / "trials"
    trials: list[Trial] = []
    reuse = plan.reuse
    best: tuple[Trial, CompileResult] | None = None

    def run(trial: Trial) -> CompileResult | None:
        nonlocal reuse, best
        trial.folder = scratch / f"{trial.index:02d}"
        started = time.perf_counter()
        try:
            result = compile_plan(plan.adjusted(exclude=trial.excluded, overrides=trial.overrides, reuse=reuse),
                                  trial.folder)
        except QCompileError as err:
            if not trials:
                raise  # the recipe as written does not compile: that is the user's error to see
            trial.error = str(err)
            trials.append(trial)
            return None
        trial.seconds = time.perf_counter() - started
        trial.value = budget.value(result)
        trial.quantized = result.layers.count(LayerStatus.QUANTIZED)
        reuse = reuse or result.stats.observers()
        trials.append(trial)
        log.info("budget trial %d (%s): %s = %s", trial.index, trial.change, budget.metric, trial.value)
        if best is None or _better(trial, best[0], budget):
            best = (trial, result)
        return result

    first = run(Trial(0, "recipe as written", (), {}))
    method_overrides: dict = {}
    if calibrate is not None:
        for method in _RANGE_METHODS:
            if budget.met(best[0].value) or len(trials) >= max_trials:
                break
            if method == calibrate.config.method:
                continue
            run(Trial(len(trials), f"calibrate.method = {method}", (), {"calibrate": {"method": method}}))
        method_overrides = dict(best[0].overrides)
    ranking = ranked_layers((best[1] if best else first).layers)

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
    keep_only(folder, winner.folder)
    result.folder = folder
    result.strategy["budget"] = {"metric": budget.metric, "threshold": budget.threshold,
                                 "met": budget.met(winner.value), "best_trial": winner.index, "value": winner.value,
                                 "judged_on": "verification data", "trials": [t.to_json() for t in trials]}
    if not budget.met(winner.value):
        result.warnings.warn(f"accuracy budget {budget} not met in {len(trials)} trials; the best "
                             f"({budget.metric} = {winner.value}) is in {destination or folder}")
    return result


def _better(a: Trial, b: Trial, budget: Budget) -> bool:
    """Meeting the budget with more layers quantized beats everything; else the higher metric."""
    if a.value is None:
        return False
    if b.value is None:
        return True
    if budget.met(a.value) and budget.met(b.value):
        return a.quantized > b.quantized
    return a.value > b.value
