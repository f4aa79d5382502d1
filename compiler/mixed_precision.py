"""Mixed precision under a size budget: per layer int4, int8 or float, chosen to keep the
measured error lowest while the quantized weights fit in `--max-size` MB.

Two trial compiles measure every layer both ways — the `low` scheme (default `w4a16`) and the
`high` one (default `w8a16`) — verification giving each layer's added noise (the noise-to-
signal ratio behind `added_sqnr_db`) and the quantize report its weight bytes. Starting from
all-low, layers are promoted to high, then to float, in order of noise removed per byte
added, while the total fits. The result is compiled with a `mix` table naming every promoted
layer, and `report.json → mixed_precision` lists each layer's choice and the estimate.
Noise ratios are assumed to add across layers (they do to first order: verify's per-layer
figures are built that way).
"""

from __future__ import annotations

import glob
from pathlib import Path

from .errors import UsageError
from .output import StagedOutput


def _noise(rec: dict) -> float | None:
    err = rec.get("error") or {}
    added = err.get("added_sqnr_db", err.get("sqnr_db"))
    if not isinstance(added, (int, float)):
        return None
    return 10.0 ** (-float(added) / 10.0)


def choose(low: dict, high: dict, budget_bytes: float) -> tuple[dict[str, str], dict]:
    """Per-layer choice ('low' | 'high' | 'float') from two compile reports, within the budget."""
    layers = {}
    for name, rec in low["layers"].items():
        other = high["layers"].get(name, {})
        if rec.get("status") != "quantized" or other.get("status") != "quantized":
            continue
        n_low, n_high = _noise(rec), _noise(other)
        b_low = rec["weight_bytes"]["quantized"]
        b_high = other["weight_bytes"]["quantized"]
        b_float = rec["weight_bytes"]["float"]
        layers[name] = {"low": (n_low if n_low is not None else 0.0, b_low),
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


def compile_with_size_budget(model_path, *, max_size_mb: float, low: str = "w4a16", high: str = "w8a16",
                             output_dir="out", **compile_args):
    """Two measuring compiles, the choice, and the final mixed compile (see the module docstring)."""
    from .compile import compile_model
    from .report import write_report

    if max_size_mb <= 0:
        raise UsageError(f"--max-size must be positive, got {max_size_mb}")
    if compile_args.get("verify") is False:
        raise UsageError("--max-size measures each layer's error by verification; drop --no-verify")
    out = StagedOutput(output_dir)
    try:
        low_run = compile_model(model_path, recipe=low, output_dir=out.path("low"), **compile_args)
        high_run = compile_model(model_path, recipe=high, output_dir=out.path("high"), **compile_args)
        choice, estimate = choose(low_run.report, high_run.report, max_size_mb * 1e6)
        mix = {glob.escape(name): (high if c == "high" else "float") for name, c in choice.items() if c != "low"}
        result = compile_model(model_path, recipe=low, output_dir=out.path("final"), overrides={"quantize": {"mix": mix}},
                               **compile_args)
        out.keep_only(out.path("final"))
        report = result.report
        counts = {c: sum(1 for v in choice.values() if v == c) for c in ("low", "high", "float")}
        report["mixed_precision"] = {"max_size_mb": max_size_mb, "low": low, "high": high, "counts": counts,
                                     "estimate": estimate, "layers": choice,
                                     "quantized_weight_mb": report["quantize"]["weights"]["quantized_bytes"] / 1e6,
                                     "low_only_sqnr_db": _sqnr(low_run.report), "high_only_sqnr_db": _sqnr(high_run.report)}
        write_report(out.path("report.json"), report)
        result.files, result.output_dir = out.commit(), Path(output_dir)
        return result
    except BaseException:
        out.discard()
        raise


def _sqnr(report: dict) -> float | None:
    outs = (report.get("verification") or {}).get("outputs") or {}
    vals = [o.get("sqnr_db") for o in outs.values() if isinstance(o.get("sqnr_db"), (int, float))]
    return min(vals) if vals else None
