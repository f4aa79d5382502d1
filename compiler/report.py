"""report.json for tools and a short verification table for people.

`render` is the one place a compile's results become report.json: the header, verification,
the layer table, warnings, every pass's section, the pass timings, and the sections of the
search strategy that produced it (fallback, budget, mixed precision), in that order. The
driver calls it once, at commit.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .layers import LayerStatus


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" / "-inf" / "nan": JSON has no such numbers
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def render(result) -> dict:
    """report.json's content for a CompileResult (compiler/compile.py)."""
    report = dict(result.header)
    if result.verification is not None:
        report["verification"] = result.verification
    report["layers"] = result.layers.to_json()
    report["warnings"] = result.warnings.to_json()
    report.update(result.sections)
    report["passes"] = result.timings
    if result.phases:
        report["phases"] = result.phases   # the work outside the passes: load, write, verify
    report["compile_seconds"] = round(result.seconds, 3)
    report.update(result.strategy)
    return report


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")


# why a layer stayed float, from its recorded reason (first pattern that matches wins)
FLOAT_REASON_KINDS = (
    (r"^int8 is slower", "under the speed threshold"),
    (r"^fallback", "fallback"),
    (r"^(excluded by|not matched by) quantize", "excluded by the recipe"),
    (r"^op type", "op type not in the recipe"),
    (r"^output_layers: float", "output layer kept float"),
    (r"^mix: float", "float in the mix table"),
    (r"^an outer product", "not a layer"),
    (r"not a constant|no constant weight|alpha/beta|transA|not a 2-D linear", "not a linear layer with a constant weight"),
    (r"range", "range guard"),
)
LOW_COSINE_MIN = 0.9   # a worst-sample cosine under this is worth a warning whatever the mean says


def float_reasons(layers: dict) -> dict[str, int]:
    """{kind: count} of the float layers' reasons, most frequent first."""
    counts: dict[str, int] = {}
    for record in layers.values():
        if record.get("status") != str(LayerStatus.FLOAT):
            continue
        reason = record.get("reason") or ""
        kind = next((k for pattern, k in FLOAT_REASON_KINDS if re.search(pattern, reason)), "other")
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def print_summary(report: dict, console: Console | None = None, *, header: bool = True) -> None:
    console = console or Console(stderr=False)
    layers = report.get("layers", {})
    n_q = sum(1 for r in layers.values() if r.get("status") == str(LayerStatus.QUANTIZED))
    n_f = sum(1 for r in layers.values() if r.get("status") == str(LayerStatus.FLOAT))
    kernels = report.get("cpu_kernels")
    line = f"[bold]{report['target']}[/bold] recipe [bold]{report['recipe']}[/bold]: {n_q} layers quantized, {n_f} float"
    if kernels:
        line += f"; {kernels['int8_layers']} run int8 kernels on {kernels['isa']}"
    reasons = float_reasons(layers)
    if reasons:
        line += " (" + ", ".join(f"{n} {kind}" for kind, n in reasons.items()) + ")"
    if header:
        console.print(line)
        if report.get("recipe_choice"):
            console.print(f"recipe {report['recipe']}: {report['recipe_choice']}")
    ver = report.get("verification")
    if ver and ver.get("outputs"):
        table = Table(title=f"verification on {ver['samples']} samples ({ver['data']})")
        for col in ("output", "SQNR dB", "cosine mean", "cosine min", "max |err|"):
            table.add_column(col, justify="right" if col != "output" else "left")
        for name, m in ver["outputs"].items():
            table.add_row(name, f"{m['sqnr_db']}", f"{m['cosine_mean']}", f"{m['cosine_min']}", f"{m['max_abs']}")
        console.print(table)
        for name, m in ver["outputs"].items():
            low = m.get("cosine_min")
            if isinstance(low, (int, float)) and low < LOW_COSINE_MIN:
                console.print(f"[yellow]warning:[/yellow] output {name}: the worst sample's cosine is {low} "
                              f"(mean {m['cosine_mean']}): some inputs are far off; see report.json → verification")
        task = ver.get("task")
        if task and task.get("metric") == "perplexity":
            console.print(f"perplexity over {task['tokens']} tokens: original {task['perplexity_original']}, "
                          f"compiled {task['perplexity_compiled']} ({task['perplexity_delta_pct']:+.2f} %); "
                          f"next-token top-1 agreement {task['top1_agreement']}")
        for file, found in ver.get("companions", {}).items():
            if found.get("outputs"):
                first, m = next(iter(found["outputs"].items()))
                extra = ""
                if found.get("task", {}).get("metric") == "perplexity":
                    extra = f", perplexity {found['task']['perplexity_compiled']}"
                console.print(f"{file}: {first} SQNR {m['sqnr_db']} dB, cosine mean {m['cosine_mean']}{extra} "
                              f"({found['checked']})")
            else:
                console.print(f"[yellow]{file} not verified:[/yellow] {found.get('reason')}")
        worst = sorted((v["added_sqnr_db"], k) for k, v in ver.get("layers", {}).items()  # inf: adds no error
                       if isinstance(v.get("added_sqnr_db"), (int, float)) and math.isfinite(v["added_sqnr_db"]))[:5]
        if worst:
            console.print("layers adding the most error: " +
                          ", ".join(f"{k} ({v} dB)" for v, k in worst))
    budget = report.get("budget")
    if budget:
        table = Table(title=f"accuracy budget {budget['metric']} {budget.get('op', '>=')} {budget['threshold']}: "
                            f"{'met' if budget['met'] else 'NOT met'}, kept trial {budget['best_trial']}")
        for col in ("trial", "change", budget["metric"], "quantized", "seconds"):
            table.add_column(col, justify="left" if col == "change" else "right")
        for t in budget["trials"]:
            table.add_row(str(t["trial"]), t["change"] + (f" (failed: {t['error']})" if t.get("error") else ""),
                          "-" if t["metric"] is None else f"{t['metric']:.4f}", str(t["quantized_layers"]),
                          str(t["seconds"]))
        console.print(table)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
