"""The model bench's bench.md and bench.png, and the formatting every bench table shares.

Recipe notes are read from each recipe's own YAML (`metadata.description`, first sentence), so
the bench never repeats what a recipe says it is.
"""
from __future__ import annotations

import math
from pathlib import Path

from .evaluate import METRIC_LABEL
from .peers import peers_for
from .suite import versus_all

# no onnxruntime CPU kernel computes in these formats: the artifact runs Q/DQ or casts around
# float math -- slower than fp32 by design
SIMULATED = frozenset({"w4a4", "fp8"})
_NO_PEER_NOTE = "no onnxruntime.quantization peer: compared with fp32 and qcompile w8a8"


# ------------------------------------------------------------------- rendering
def fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def recipe_note(recipe: str) -> str:
    """The first sentence of the built-in recipe's description ('–' when it has none)."""
    try:
        from qcompile.recipe_files import builtin_recipes, description
        text = description(builtin_recipes()[recipe])
    except Exception:  # noqa: BLE001 - an unknown recipe or no qcompile here: say nothing
        return "–"
    return (text.split(". ")[0].strip().rstrip(".") + ".") if text else "–"


def _metric_cell(r: dict, metric: str) -> str:
    if "task_metric" not in r:
        return "–"
    if metric == "embedding_cosine":
        return f"{r['task_metric']:.4f} / {r['task_metric_min']:.4f}"
    if metric == "ctc_agreement":
        return f"{r['task_metric']:.4f} / {fmt(r.get('task_metric_min'), '.4f')}"
    if metric == "box_f1":
        return f"{r['task_metric']:.4f} / {fmt(r.get('task_metric_min'), '.2f')}"
    return f"{r['task_metric']:.4f}"

def _pair(a, b, spec: str) -> str:
    return f"{fmt(a, spec)} / {fmt(b, spec)}"

def _comparisons(res: dict) -> list[tuple[dict, dict | None, dict | None]]:
    """(qcompile row, reference row, q-vs-ref dict) per line of the per-recipe table: each
    peer compared with the recipe; a recipe with no peer that ran (none exists, n/a on this
    model, or it failed) is compared with qcompile w8a8 instead."""
    rows = res["rows"]
    w8a8 = next((r for r in rows if r.get("key") == "qcompile-w8a8"), None)
    out = []
    for q in (r for r in rows if r["kind"] == "qcompile"):
        mine = [r for r in rows if r["kind"] not in ("qcompile", "fp32") and q["method"] in versus_all(r)
                and r["status"] != "n/a"]
        ran = [r for r in mine if r["status"] == "ok"]
        for r in mine:
            out.append((q, r, (r.get("vs_qcompile_all") or {}).get(q["method"])))
        if not ran and q is not w8a8 and w8a8 is not None:
            out.append((q, w8a8, q.get("vs_w8a8")))
        if not mine and (q is w8a8 or w8a8 is None):
            out.append((q, None, None))
    return out


def _sets_table(res: dict, label: str) -> list[str]:
    """Fidelity of every row on each data set (calibration, eval, the unseen style): whether a
    number holds beyond the data it was calibrated and tuned on."""
    labels = list(res.get("more_sets") or {})
    if not labels:
        return []
    order = ["calib", "eval", *[x for x in labels if x != "calib"]]
    head = " | ".join(f"{x} SQNR dB | {x} {label.split(' ')[0]}" for x in order)
    lines = [f"Fidelity on each data set (*calib*: the calibration samples; *eval*: held-out samples of the "
             f"same style; {', '.join(f'*{x}*' for x in labels if x != 'calib')}: see the note above):", "",
             f"| method | {head} |", "|---|" + "---:|---:|" * len(order)]
    for r in res["rows"]:
        if r["status"] != "ok" or r["kind"] == "fp32":
            continue
        cells = []
        for x in order:
            d = r if x == "eval" else (r.get("sets") or {}).get(x, {})
            cells += [fmt(d.get("sqnr_db"), ".1f"), fmt(d.get("task_metric"), ".4f")]
        name = f"**{r['method']}**" if r["kind"] == "qcompile" else r["method"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(results: list[dict], meta: dict) -> str:
    bg = meta.get("background_cpu")
    b16 = not meta.get("no_b16")
    lines = ["# qcompile vs onnxruntime.quantization", "",
             f"* date: {meta['date']}",
             f"* host: {meta['cpu']} · {meta['nproc']} cores · {meta['platform']}",
             f"* onnxruntime {meta['onnxruntime']} · onnx {meta['onnx']} · qcompile {meta['qcompile']} "
             f"(git {meta['git']}) · Python {meta['python']}",
             f"* command: `{meta['command']}`",
             f"* target `cpu` ({meta.get('cpu_variant') or 'host ISA'}); recipes {', '.join(meta['recipes'])}",
             f"* latency: onnxruntime CPU EP, ORT_ENABLE_ALL (unless a row says otherwise), {meta['threads']} "
             f"intra-op threads, random inputs; each pass a fresh process, the median of {meta['latency_runs']} "
             f"runs after {meta['latency_warmup']} warm-up runs; per model the best *quiet* pass (other processes "
             f"< {100 * meta.get('latency_quiet', 0.1):.0f}% of the box while it timed) out of at least "
             f"{meta['latency_passes']} and at most {meta.get('latency_max_passes', 3 * meta['latency_passes'])} "
             f"passes (rows without a quiet pass say so)",
             *(["* batch 16: peers and fp32 run their batch-1 artifact (batch axis left dynamic); qcompile runs a "
                "second artifact compiled with `--input-shape NAME:16,...` (same calibration data)"] if b16 else
               ["* batch 16: not measured (`--no-b16`)"]),
             f"* eval samples: {meta['eval_samples'] or 'all'}",
             f"* load average at start {meta['loadavg_start'][0]:.2f}; other processes used "
             f"{fmt(None if bg is None else 100 * bg, '.0f')}% of the CPU during the whole run"
             + (" — **timings are contended: read the ratios, not the absolute numbers**" if (bg or 0) > 0.1 else ""),
             "",
             "Columns: `qc÷peer` = the qcompile row named in *compared with* divided by this peer (< 1: qcompile "
             "compiles faster / uses less memory / is smaller). `×fp32` = latency speed-up over the fp32 model "
             "(fp32 ms ÷ row ms; > 1 is faster). See README.md in this folder.", "",
             "Recipes:", "",
             "| recipe | what it is | onnxruntime peer(s) in this bench |", "|---|---|---|"]
    for rc in meta["recipes"]:
        lines.append(f"| `{rc}` | {recipe_note(rc)} | {', '.join(peers_for(rc)) or _NO_PEER_NOTE} |")
    lines.append("")
    for res in results:
        if "error" in res:
            lines += [f"## {res['model']}", "", f"**benchmark failed:** {res['error']}", ""]
            continue
        label = METRIC_LABEL[res["metric"]]
        lines += [f"## {res['model']} (`{res['input_shape']}`, {res['n_eval']} eval / {res['n_calib']} calib samples)",
                  "", *(f"{n}." for n in res.get("notes", [])), "",
                  f"| method | compared with | compile s | qc÷peer | peak RSS MB | qc÷peer | size MB | qc÷peer "
                  f"| {label} | SQNR dB | cosine | b1 ms | b1 ×fp32 |" + (" b16 ms | b16 ×fp32 |" if b16 else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if b16 else "")]
        notes = []
        for r in res["rows"]:
            vs = r.get("vs_qcompile") or {}
            name = f"**{r['method']}**" if r["kind"] == "qcompile" else r["method"]
            others = [v.replace("qcompile ", "") for v in versus_all(r)[1:]]
            versus = (r.get("versus") or "–") + (f" (also {', '.join(others)})" if others else "")
            if r["status"] != "ok":
                lines.append(f"| {name} | {versus} | {fmt(r.get('wall_s'), '.1f')} | | "
                             f"{fmt(r.get('peak_rss_mb'), '.0f')} | | | | {r['status']} | | | | |"
                             + (" | |" if b16 else ""))
                notes.append(f"- **{r['method']}** {'failed' if r['status'] == 'error' else 'not applicable'}: "
                             f"{r.get('error')}")
                continue
            lines.append(
                f"| {name} | {versus} | {fmt(r.get('wall_s'), '.1f')} | {fmt(vs.get('compile_time'), '.2f')} "
                f"| {fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(vs.get('peak_rss'), '.2f')} | {fmt(r.get('size_mb'), '.2f')} "
                f"| {fmt(vs.get('size'), '.2f')} | {_metric_cell(r, res['metric'])} | {fmt(r.get('sqnr_db'), '.1f')} "
                f"| {fmt(r.get('cosine'), '.4f')} | {fmt(r.get('latency_b1_ms'), '.2f')} | {fmt(r.get('speedup_b1'), '.2f')} |"
                + (f" {fmt(r.get('latency_b16_ms'), '.1f')} | {fmt(r.get('speedup_b16'), '.2f')} |" if b16 else ""))
            if r.get("ort_level"):
                notes.append(f"- **{r['method']}**: onnxruntime CPU does not load it at the higher graph optimization "
                             f"levels, so its accuracy and latency are measured at {r['ort_level']} (the only way to "
                             f"run it): " + " | ".join(e[:300] for e in r.get("ort_level_errors", [])))
            if r.get("default_attempt"):
                d = r["default_attempt"]
                notes.append(f"- **{r['method']}**: with ORT defaults it failed after {d['wall_s']:.0f}s "
                             f"({d['error']}); re-run with `CalibStridedMinMax={r['calib_stride']}`.")
            for k in ("eval_error", "latency_b1_error", "latency_b16_error"):
                if r.get(k):
                    notes.append(f"- **{r['method']}** {k.replace('_', ' ')}: {r[k]}")
            for b in ("b1", "b16"):
                if r.get(f"latency_{b}_runs"):
                    notes.append(f"- **{r['method']}** {b} latency: median of {r[f'latency_{b}_runs']} runs per pass, "
                                 f"{r[f'latency_{b}_passes']} pass(es), not {meta['latency_runs']} "
                                 f"({meta['latency_runs']} runs would have taken more than "
                                 f"{meta['latency_pass_budget']:.0f} s).")
                if r.get(f"latency_{b}_quiet") is False:
                    o = r.get(f"latency_{b}_other_cpu")
                    notes.append(f"- **{r['method']}** {b} latency: no quiet pass in {r.get(f'latency_{b}_passes_done')} "
                                 f"— other processes used {fmt(None if o is None else 100 * o, '.0f')}% of the box "
                                 f"during the pass kept; read its ms and ratios as upper bounds.")
            b = r.get("b16_artifact")
            if b:
                if b["status"] == "ok":
                    notes.append(f"- **{r['method']}** batch-16 artifact: compiled in {b['wall_s']:.1f} s, "
                                 f"peak RSS {b['peak_rss_mb']:.0f} MB.")
                elif b["status"] == "n/a":
                    notes.append(f"- **{r['method']}** batch-16 artifact: not applicable, {b['error']}.")
                else:
                    notes.append(f"- **{r['method']}** batch-16 artifact failed: {b['error']}")
        lines.append("")
        lines += _sets_table(res, label)
        comps = _comparisons(res)
        if any(ref is not None for _, ref, _ in comps):
            lines += ["Per recipe: each cell is *qcompile / the row it is compared with* (its onnxruntime peer; "
                      "qcompile w8a8 where no peer applies); `qc÷` = qcompile ÷ that row (< 1: smaller / faster).", "",
                      f"| recipe | compared with | {label.split(' / ')[0].replace('mean', '(mean)')} | SQNR dB | cosine "
                      f"| b1 ×fp32 | b1 ms qc÷ | size MB "
                      f"| size qc÷ | compile s |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for q, ref, v in comps:
                rn = f"**{q['recipe']}**" + (" (sim.)" if q["recipe"] in SIMULATED else "")
                if q["status"] != "ok":
                    lines.append(f"| {rn} | {ref['method'] if ref else '–'} | qcompile failed | | | | | | | |")
                    continue
                if ref is None:
                    lines.append(f"| {rn} | – | {fmt(q.get('task_metric'), '.4f')} | {fmt(q.get('sqnr_db'), '.1f')} "
                                 f"| {fmt(q.get('cosine'), '.4f')} | {fmt(q.get('speedup_b1'), '.2f')} | – "
                                 f"| {fmt(q.get('size_mb'), '.2f')} | – | {fmt(q.get('wall_s'), '.1f')} |")
                    continue
                if ref["status"] != "ok":
                    lines.append(f"| {rn} | {ref['method']} | {ref['status']}: see below | | | | | | | |")
                    continue
                v = v or {}
                lines.append(
                    f"| {rn} | {ref['method']} | {_pair(q.get('task_metric'), ref.get('task_metric'), '.4f')} "
                    f"| {_pair(q.get('sqnr_db'), ref.get('sqnr_db'), '.1f')} "
                    f"| {_pair(q.get('cosine'), ref.get('cosine'), '.4f')} "
                    f"| {_pair(q.get('speedup_b1'), ref.get('speedup_b1'), '.2f')} | {fmt(v.get('latency_b1'), '.2f')} "
                    f"| {_pair(q.get('size_mb'), ref.get('size_mb'), '.2f')} | {fmt(v.get('size'), '.3f')} "
                    f"| {_pair(q.get('wall_s'), ref.get('wall_s'), '.1f')} |")
            lines.append("")
        for recipe, bar in (res.get("bars") or {}).items():
            q = next(r for r in res["rows"] if r.get("key") == f"qcompile-{recipe}")
            pr = next(r for r in res["rows"] if r.get("key") == bar["peer_key"])
            lines += [f"**Bar {recipe} vs {pr['method']}** — fidelity ≥ peer ({label.split(' / ')[0]} "
                      f"{q['task_metric']:.4f} vs {pr['task_metric']:.4f}, SQNR {q['sqnr_db']:.2f} vs "
                      f"{pr['sqnr_db']:.2f} dB): **{'holds' if bar['fidelity_holds'] else 'FAILS'}**; size within "
                      f"{100 * bar['tolerance']:.0f} % ({q['size_mb']:.2f} vs {pr['size_mb']:.2f} MB, "
                      f"{bar['size_ratio']:.3f}×): **{'holds' if bar['size_holds'] else 'FAILS'}**.", ""]
        for qname, s in res["summary"].items():
            if s.get("qcompile_status") != "ok":
                lines += [f"{qname} failed — no ratios.", ""]
                continue
            if s.get("best_peer") is None:
                continue
            lines.append(
                f"{qname} vs its best peer **{s['best_peer']}** (by SQNR): compile time "
                f"{fmt(s.get('compile_time'), '.2f')}×, peak RSS {fmt(s.get('peak_rss'), '.2f')}×, size "
                f"{fmt(s.get('size'), '.2f')}×, SQNR {fmt(s.get('sqnr_delta_db'), '+.1f')} dB; speed-up vs fp32 "
                f"b1 {fmt(s.get('qcompile_speedup_b1'), '.2f')}× (peer {fmt(s.get('best_peer_speedup_b1'), '.2f')}×)"
                + (f", b16 {fmt(s.get('qcompile_speedup_b16'), '.2f')}× (peer "
                   f"{fmt(s.get('best_peer_speedup_b16'), '.2f')}×)" if b16 else "") + ".")
            lines.append("")
        lsum = [(r, r["layer_summary"]) for r in res["rows"] if r["kind"] == "qcompile" and r.get("layer_summary")]
        if lsum:
            lines += ["Layers per recipe (from each compile's report.json: op: scheme -> CPU kernel × count; weight "
                      "bytes float → quantized):", ""]
            for r, ls in lsum:
                w = ((r.get("report") or {}).get("quantize") or {}).get("weights") or {}
                wb = (f" — weights {w['float_bytes'] / 1e6:.3g} → {w['quantized_bytes'] / 1e6:.3g} MB "
                      f"({w.get('compression')}×)" if w.get("float_bytes") and w.get("quantized_bytes") is not None
                      else "")
                lines.append(f"- **{r['recipe']}**: " + "; ".join(f"{k} ×{n}" for k, n in ls["counts"].items()) + wb)
            lines.append("")
        bgm = res.get("background_cpu_during_latency") or {}
        if any((v or 0) > 0.1 for v in bgm.values()):
            lines.append("⚠ other processes used " + ", ".join(
                f"{100 * v:.0f}% ({k})" for k, v in bgm.items() if v is not None)
                + " of the CPU while latency was measured.")
            lines.append("")
        if res.get("hist_calib_stride"):
            notes.append(f"- *(stride {res['hist_calib_stride']})*: histogram-calibrated peers (Percentile/Entropy, "
                         f"FP8 Distribution) run with ORT "
                         f"`extra_options={{'CalibStridedMinMax': {res['hist_calib_stride']}}}`: with ORT defaults "
                         f"they hold every activation of all {res['n_calib']} samples "
                         f"(~{res['activation_mb_per_sample'] * res['n_calib'] / 1e3:.1f} GB by shape inference).")
        if notes:
            lines += notes + [""]
    return "\n".join(lines)


# Marker per method (same in every panel): colour family by kind, shape by variant.
_STYLE = {
    "qcompile-w8a8": dict(marker="*", color="#d62728", s=220),
    "qcompile-w8a16": dict(marker="D", color="#d62728", s=90),
    "qcompile-w8a8-dynamic": dict(marker="P", color="#d62728", s=110),
    "qcompile-w4a16": dict(marker="v", color="#d62728", s=90),
    "qcompile-w4a8": dict(marker="<", color="#d62728", s=90),
    "qcompile-w4a4": dict(marker="X", color="#d62728", s=90),
    "qcompile-fp8": dict(marker="h", color="#d62728", s=100),
    "qcompile-w8a8-mix": dict(marker="p", color="#d62728", s=100),
    "qcompile-w8a8-smooth": dict(marker="8", color="#d62728", s=110),
    "qcompile-w4a16-gptq": dict(marker="d", color="#d62728", s=100),
    "qcompile-w4a16-awq": dict(marker="^", color="#d62728", s=100),
    "static-minmax": dict(marker="o", color="#1f77b4", s=70),
    "static-percentile": dict(marker="s", color="#1f77b4", s=70),
    "static-entropy": dict(marker="^", color="#1f77b4", s=80),
    "static-mm-minmax": dict(marker="o", color="#17becf", s=70),
    "static-mm-percentile": dict(marker="s", color="#17becf", s=70),
    "static-mm-entropy": dict(marker="^", color="#17becf", s=80),
    "dynamic": dict(marker="P", color="#2ca02c", s=90),
    "nbits4-rtn": dict(marker="v", color="#ff7f0e", s=80),
    "nbits4-rtn-acc4": dict(marker="<", color="#ff7f0e", s=80),
    "nbits4-gptq": dict(marker="d", color="#ff7f0e", s=80),
    "static-minmax-sq": dict(marker="8", color="#1f77b4", s=70),
    "nbits8": dict(marker=">", color="#ff7f0e", s=80),
    "fp8": dict(marker="h", color="#9467bd", s=80),
    "fp8-mm": dict(marker="H", color="#9467bd", s=80),
}

def render_plot(results: list[dict], path: Path) -> str | None:
    """SQNR (dB) against batch-1 speed-up vs fp32, one panel per model, one marker per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"plot skipped: {exc}"
    res = [r for r in results if "rows" in r]
    if not res:
        return "plot skipped: no results"
    n = len(res)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    handles = {}
    for ax, r in zip(axes.flat, res):
        for row in r["rows"]:
            x, y = row.get("speedup_b1"), row.get("sqnr_db")
            if row["kind"] == "fp32" or x is None or y is None or not math.isfinite(y):
                continue
            st = _STYLE.get(row["key"], dict(marker="x", color="gray", s=60))
            h = ax.scatter([x], [y], edgecolors="black", linewidths=0.5, zorder=3, **st)
            handles.setdefault(row["key"], (h, row["method"].split(" (stride")[0]))
        ax.axvline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_title(f"{r['model']} ({r['input_shape']})", fontsize=10)
        ax.set_xlabel("batch-1 latency speed-up vs fp32 (×)")
        ax.set_ylabel("SQNR vs fp32 (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    order = [k for k in _STYLE if k in handles] + [k for k in handles if k not in _STYLE]
    if not order:
        plt.close(fig)
        return "plot skipped: no row has both a latency and a finite SQNR"
    fig.legend([handles[k][0] for k in order], [handles[k][1] for k in order], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title="method", title_fontsize=9)
    fig.suptitle("accuracy vs batch-1 speed-up (up and right is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
