"""The accuracy budget: compile, verify, and fall layers back to float (or change the
calibration method) until a metric holds — always returning the best model found.

`--max-loss "cosine>=0.995"` (or `sqnr>=30`; for a causal LM `ppl<=+1%`, the perplexity
increase over the original's in percent, or `top1>=0.9`, next-token agreement) turns one
compile into a search:

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

_RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass(frozen=True)
class Metric:
    """A verification number a budget can bound: where it is read, which way is better."""
    op: str                     # ">=" (higher is better) or "<="
    output_key: str | None      # worst over the outputs of this ErrorStats key, or
    task_key: str | None        # this key of the task metrics (causal LMs)
    causal_lm: bool = False     # only for causal LMs (input_ids -> logits)
    unit: str = ""

    def read(self, result: CompileResult) -> float | None:
        if self.output_key is not None:
            return result.worst_output(self.output_key)
        value = ((result.verification or {}).get("task") or {}).get(self.task_key)
        return float(value) if isinstance(value, (int, float)) else None


METRICS = {
    "cosine": Metric(">=", "cosine_mean", None),
    "sqnr": Metric(">=", "sqnr_db", None, unit=" dB"),
    "ppl": Metric("<=", None, "perplexity_delta_pct", causal_lm=True, unit="%"),
    "top1": Metric(">=", None, "top1_agreement", causal_lm=True),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str        # a METRICS key
    threshold: float

    @property
    def spec(self) -> Metric:
        return METRICS[self.metric]

    def value(self, result: CompileResult) -> float | None:
        """The metric (over all outputs, their worst; or the task metric), or None when
        verification did not run."""
        return self.spec.read(result)

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return value >= self.threshold if self.spec.op == ">=" else value <= self.threshold

    def better(self, a: float, b: float) -> bool:
        """Whether metric value `a` is better than `b`."""
        return a > b if self.spec.op == ">=" else a < b

    def check_model(self, model_path) -> None:
        """Refuse, before any work, a task metric the model has no task for."""
        if not self.spec.causal_lm:
            return
        import onnx

        from .lm_metrics import is_causal_lm
        graph = onnx.load(str(model_path), load_external_data=False).graph
        outputs = {o.name: tuple(o.type.tensor_type.shape.dim) for o in graph.output}
        if not is_causal_lm([i.name for i in graph.input], outputs):
            raise UsageError(f"--max-loss {self}: {self.metric} is a causal-LM metric, but {model_path} is not one "
                             f"(it needs an input_ids input and a [batch, sequence, vocabulary] logits output)",
                             hint="bound cosine or sqnr instead, e.g. --max-loss cosine>=0.995")

    def __str__(self) -> str:
        return f"{self.metric}{self.spec.op}{self.threshold:g}{self.spec.unit if self.spec.unit == '%' else ''}"


def parse_budget(text: str) -> Budget:
    """`cosine>=0.995`, `sqnr>=30` (dB; both the worst over the model's outputs), `ppl<=+1%`
    (perplexity increase in percent) or `top1>=0.95` (next-token agreement)."""
    m = re.fullmatch(r"\s*([a-z_0-9]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*(%?)\s*", text or "")
    if not m:
        raise UsageError(f"--max-loss {text!r} is not METRIC>=VALUE (or ppl<=VALUE%)",
                         hint=f"e.g. --max-loss cosine>=0.995, sqnr>=30, ppl<=+1%, top1>=0.95; "
                              f"metrics: {', '.join(METRICS)}")
    name, op, value, percent = m.groups()
    if name not in METRICS:
        raise UsageError(f"--max-loss: unknown metric {name!r}", hint=f"metrics: {', '.join(METRICS)}")
    spec = METRICS[name]
    if op != spec.op:
        raise UsageError(f"--max-loss: {name} takes {spec.op}, not {op}",
                         hint=f"e.g. {name}{spec.op}{'+1%' if name == 'ppl' else '0.995'}")
    if percent and spec.unit != "%":
        raise UsageError(f"--max-loss: {name} is not a percentage; drop the %")
    try:
        threshold = float(value)
    except ValueError:
        raise UsageError(f"--max-loss: {value!r} is not a number") from None
    if name in ("cosine", "top1") and not (-1.0 if name == "cosine" else 0.0) <= threshold <= 1.0:
        raise UsageError(f"--max-loss: a {name} threshold is in [{-1 if name == 'cosine' else 0}, 1], got {threshold}")
    if name == "ppl" and threshold < 0:
        raise UsageError(f"--max-loss: a perplexity budget is an allowed increase (>= 0 %), got {threshold}")
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
    budget.check_model(plan.model)
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
    result.strategy["budget"] = {"metric": budget.metric, "op": budget.spec.op, "threshold": budget.threshold,
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
    return budget.better(a.value, b.value)
