"""Mixed precision under a size budget: per layer int4, int8 or float, chosen to keep the
measured error lowest while the quantized weights fit in `--max-size` MB.

Two trial compiles measure every layer both ways — the `low` scheme (default `w4a16`) and the
`high` one (default `w8a16`) — verification giving each layer's added noise (the noise-to-
signal ratio behind `added_sqnr_db`) and the layer table its weight bytes. Starting from
all-low, layers are promoted to high, then to float, in order of noise removed per byte
added, while the total fits. The result is compiled with a `mix` table naming every promoted
layer, and `report.json → mixed_precision` lists each layer's choice and the estimate.
Noise ratios are assumed to add across layers (they do to first order: verify's per-layer
figures are built that way).
"""

from __future__ import annotations

import glob
from pathlib import Path

from .compile import CompileResult
from .errors import UsageError
from .fallback import compile_plan
from .layers import LayerRecord, LayerTable
from .output import keep_only
from .plan import CompilePlan


def _noise(record: LayerRecord) -> float | None:
    err = record.error
    if err is None:
        return None
    added = err.added_sqnr_db if err.added_sqnr_db is not None else err.sqnr_db
    if not isinstance(added, (int, float)):
        return None
    return 10.0 ** (-float(added) / 10.0)


def choose(low: LayerTable, high: LayerTable, budget_bytes: float) -> tuple[dict[str, str], dict]:
    """Per-layer choice ('low' | 'high' | 'float') from the two compiles' layer tables, within the budget."""
    layers = {}
    for rec in low.quantized():
        other = high.get(rec.name)
        if other is None or not other.is_quantized:
            continue
        n_low, n_high = _noise(rec), _noise(other)
        b_low, b_high, b_float = rec.weight_bytes.quantized, other.weight_bytes.quantized, rec.weight_bytes.float
        layers[rec.name] = {"low": (n_low if n_low is not None else 0.0, b_low),
                            "high": (n_high if n_high is not None else 0.0, b_high), "float": (0.0, b_float)}
    choice = dict.fromkeys(layers, "low")
    total = sum(v["low"][1] for v in layers.values())
    if total > budget_bytes:
        raise UsageError(f"--max-size: even the low scheme needs {total / 1e6:.3f} MB of weights, over the "
                         f"budget of {budget_bytes / 1e6:.3f} MB", hint="raise --max-size or pick a smaller low scheme")
    order = ("low", "high", "float")
    while True:
        best, best_gain = None, 0.0
        for name, opts in layers.items():
            current = choice[name]
            if current == "float":
                continue
            nxt = order[order.index(current) + 1]
            extra = opts[nxt][1] - opts[current][1]
            gain = opts[current][0] - opts[nxt][0]
            if extra <= 0 or total + extra > budget_bytes or gain <= 0:
                continue
            if gain / extra > best_gain:
                best, best_gain = (name, nxt, extra), gain / extra
        if best is None:
            break
        name, nxt, extra = best
        choice[name] = nxt
        total += extra
    estimate = {"weight_bytes": int(total), "noise_ratio": sum(layers[n][c][0] for n, c in choice.items())}
    return choice, estimate


def search(plan: CompilePlan, folder: Path, *, max_size_mb: float, low: str = "w4a16",
           high: str = "w8a16") -> CompileResult:
    """Two measuring compiles, the choice, and the final mixed compile (the module docstring);
    `plan` is the compile as asked, its recipe replaced by `low` and `high`."""
    if max_size_mb <= 0:
        raise UsageError(f"--max-size must be positive, got {max_size_mb}")
    if not plan.verify.enabled:
        raise UsageError("--max-size measures each layer's error by verification; drop --no-verify")
    low_plan, high_plan = plan.with_recipe(low), plan.with_recipe(high)
    low_run = compile_plan(low_plan, folder / "low")
    high_run = compile_plan(high_plan, folder / "high")
    choice, estimate = choose(low_run.layers, high_run.layers, max_size_mb * 1e6)
    mix = {glob.escape(name): (high if c == "high" else "float") for name, c in choice.items() if c != "low"}
    result = compile_plan(low_plan.adjusted(overrides={"quantize": {"mix": mix}}), folder / "final")
    keep_only(folder, folder / "final")
    result.folder = folder
    counts = {c: sum(1 for v in choice.values() if v == c) for c in ("low", "high", "float")}
    result.strategy["mixed_precision"] = {
        "max_size_mb": max_size_mb, "low": low, "high": high, "counts": counts, "estimate": estimate,
        "layers": choice, "quantized_weight_mb": result.sections["quantize"]["weights"]["quantized_bytes"] / 1e6,
        "low_only_sqnr_db": low_run.worst_output("sqnr_db"), "high_only_sqnr_db": high_run.worst_output("sqnr_db")}
    return result
