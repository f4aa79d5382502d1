"""OUT/report.html: report.json made readable, in one self-contained file that opens offline.

The same numbers as report.json (it is rendered from that dict, nothing recomputed): the
verification table and the task metric, a plot of the noise each quantized layer adds (SQNR
of its output against the original's, over what its input already carried), which layers
stayed float and why, the kernel each layer got, the weight bytes before and after, the
budget / fallback trials and the warnings. Figures are matplotlib SVG inlined in the page;
without matplotlib the page has the tables only and says so.
"""

from __future__ import annotations

import html
import io
import math

REPORT_HTML = "report.html"
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;font-size:90%}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}.warn{color:#a60}
h1{font-size:140%}h2{font-size:115%;margin-top:1.5em}"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td class=n>{_e(v)}</td>" if i in numeric else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _noise_figure(layers: dict) -> str | None:
    """Bar chart of each quantized layer's added SQNR (graph order), as inline SVG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names, values = [], []
    for name, entry in layers.items():
        v = entry.get("added_sqnr_db", entry.get("sqnr_db"))
        if isinstance(v, (int, float)) and math.isfinite(v):
            names.append(name)
            values.append(v)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.18 * len(names)), 3.6))
    worst = sorted(values)[:5]
    ax.bar(range(len(values)), values, color=["#c0392b" if v in worst else "#2e86c1" for v in values])
    ax.set_ylabel("added SQNR (dB, higher = less noise)")
    ax.set_xlabel("quantized layers, in graph order (the 5 noisiest in red)")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), [n[-28:] for n in names], rotation=70, fontsize=6, ha="right")
    else:
        ax.set_xticks([])
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def render_html(report: dict) -> str:
    ver = report.get("verification") or {}
    layers = report.get("layers") or {}
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>qcompile report: {_e(report.get('model'))}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>{_e(report.get('model'))} → {_e(report.get('target'))}, recipe {_e(report.get('recipe'))}</h1>"]
    if report.get("recipe_choice"):
        parts.append(f"<p>Recipe chosen: {_e(report['recipe_choice'])}</p>")
    parts.append(f"<p>Compiled in {_e(report.get('compile_seconds'))} s; opset {_e(report.get('opset'))}.</p>")
    if ver.get("outputs"):
        parts.append(f"<h2>Verification</h2><p>{_e(ver.get('samples'))} samples ({_e(ver.get('data'))}); "
                     f"checked: {_e(ver.get('checked'))}.</p>")
        parts.append(_table(["output", "SQNR dB", "cosine mean", "cosine min", "max |err|"],
                            [[k, o.get("sqnr_db"), o.get("cosine_mean"), o.get("cosine_min"), o.get("max_abs")]
                             for k, o in ver["outputs"].items()], {1, 2, 3, 4}))
        task = ver.get("task")
        if task and task.get("metric") == "perplexity":
            parts.append(f"<p>Perplexity over {_e(task['tokens'])} tokens: original {_e(task['perplexity_original'])},"
                         f" compiled {_e(task['perplexity_compiled'])} ({task['perplexity_delta_pct']:+.2f} %); "
                         f"next-token top-1 agreement {_e(task['top1_agreement'])}.</p>")
    figure = _noise_figure(ver.get("layers") or {})
    parts.append("<h2>Noise added per layer</h2>" + (figure or "<p>(no per-layer measurement, or matplotlib is not "
                                                               "installed: see the table)</p>"))
    rows, before, after = [], 0, 0
    for name, r in layers.items():
        wb = r.get("weight_bytes") or {}
        before += wb.get("float", 0)
        after += wb.get("quantized", 0)
        added = ((ver.get("layers") or {}).get(name) or {}).get("added_sqnr_db")
        rows.append([name, r.get("op"), r.get("status"), r.get("scheme") or r.get("reason"),
                     r.get("kernel") or r.get("lowered_to") or r.get("ascend"), added,
                     f"{wb['float']:,} → {wb['quantized']:,}" if wb else ""])
    if layers:
        from .report import float_reasons
        reasons = float_reasons(layers)
        parts.append(f"<h2>Layers</h2><p>{sum(1 for r in layers.values() if r.get('status') == 'quantized')} "
                     f"quantized, {sum(reasons.values())} float"
                     + (" (" + ", ".join(f"{n} {k}" for k, n in reasons.items()) + ")" if reasons else "")
                     + (f"; quantized layers' weights {before:,} → {after:,} bytes" if before else "") + ".</p>")
        parts.append(_table(["layer", "op", "status", "scheme / why float", "kernel / lowered to", "added SQNR dB",
                             "weight bytes"], rows, {5}))
    for key, title in (("budget", "Accuracy budget trials"), ("mixed_precision", "Mixed precision")):
        section = report.get(key)
        if section and section.get("trials"):
            trials = section["trials"]
            cols = [c for c in trials[0] if not isinstance(trials[0][c], (dict, list))]
            parts.append(f"<h2>{title}</h2>" + _table(cols, [[t.get(c) for c in cols] for t in trials]))
    if report.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class=warn>{_e(w)}</li>" for w in report["warnings"])
                     + "</ul>")
    parts.append("<p>Everything here is in report.json beside this file.</p></body></html>")
    return "\n".join(parts)


def write_html(path, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))
