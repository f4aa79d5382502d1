"""Side-by-side benchmark on the PP-OCR models: fp32 vs ORT quantize_static peers vs qcompile.

Why: one command that answers "is qcompile better than what ORT users already
have?" on real models with realistic data -- accuracy (SQNR, cosine, task
metric), compile cost (wall time and peak RSS of a fresh subprocess, measured
identically for peers and qcompile) and CPU latency.

qcompile is invoked exactly as a user would::

    <python> -m qcompile MODEL --target cpu --recipe w8a8 --calib CALIB.npz \
        --input-shape x:1,3,640,640 -o OUTDIR --no-verify [extra args]

and its model is read from OUTDIR/model.onnx.  A failing qcompile run becomes an
error row; the peers are still reported.

Usage::

    python tools/bench_spine.py [--models ppocr_det,ppocr_cls] [--recipe w8a8]
        [--extra-args "..."] [--json out.json] [--md out.md] [--quick]

``--quick``: ppocr_cls only, 8 eval samples, 10 latency runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sibling import load as _load  # noqa: E402


zoo = _load("qc_zoo", ROOT / "models" / "zoo.py")
ppd = _load("qc_ppocr_data", ROOT / "tools" / "ppocr_data.py")
peers = _load("qc_peers", ROOT / "tools" / "peers.py")

__all__ = ["bench_model", "qcompile_command", "run_qcompile", "render_markdown", "main"]

TASK_METRIC = {"ppocr_det": ("det IoU", lambda ref, out: ppd.det_iou(ref, out)),
               "ppocr_cls": ("cls agree", lambda ref, out: ppd.cls_agreement(ref, out))}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class CpuWatch:
    """Share of the box's CPU used by *other* processes (and VM steal) while active.

    Why: on a shared 2-core machine a concurrent job silently inflates compile
    times and latencies; this puts a number on it in the report.
    (/proc/stat busy time minus this process's and its waited children's CPU time.)
    """

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), self._sys_busy(), self._own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        other = (self._sys_busy() - self._busy) - (self._own_cpu() - self._own)
        self.other_frac = max(0.0, other) / max(wall * (os.cpu_count() or 1), 1e-9) \
            if self._busy is not None else None
        return False

    @staticmethod
    def _sys_busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal ...
            return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own_cpu():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def qcompile_command(python: str, model, calib, shape_arg: str, out_dir, recipe: str = "w8a8",
                     extra_args: str = "") -> list[str]:
    return [python, "-m", "qcompile", str(model), "--target", "cpu", "--recipe", recipe,
            "--calib", str(calib), "--input-shape", shape_arg, "-o", str(out_dir), "--no-verify",
            *shlex.split(extra_args or "")]


def run_qcompile(python: str, model, calib, shape_arg: str, out_dir, *, recipe="w8a8",
                 extra_args="", timeout=1800, mem_limit_mb=None) -> dict:
    """Run the qcompile CLI in a fresh subprocess, measured like the peers."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)              # never pick up a stale model.onnx
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = qcompile_command(python, model, calib, shape_arg, out_dir, recipe, extra_args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = peers.run_measured(cmd, timeout=timeout, cwd=str(ROOT), env=env,
                           mem_limit_mb=mem_limit_mb, log_path=out_dir.parent / "qcompile.log")
    out = out_dir / "model.onnx"
    ok = r["rc"] == 0 and not r["error"] and out.is_file()
    err = r["error"] or (None if ok else f"qcompile exited 0 but {out} is missing")
    return dict(method=f"qcompile {recipe}", key="qcompile", status="ok" if ok else "error",
                rc=r["rc"], wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
                size_mb=peers.model_size_mb(out) if ok else None, out=str(out) if ok else None,
                error=err, command=" ".join(shlex.quote(c) for c in cmd))


def _score(row: dict, model_name: str, model_path, eval_npz, ref: dict, n_eval: int,
           threads: int, outs: dict | None = None, labels=None) -> None:
    """Fill the accuracy columns of a row in place; errors go to row['eval_error']."""
    try:
        if outs is None:
            outs = peers.run_model(model_path, eval_npz, limit=n_eval, threads=threads)
        per_out = peers.compare(outs, ref)
        first = next(iter(per_out.values()))
        label, fn = TASK_METRIC[model_name]
        ref0, out0 = next(iter(ref.values())), next(iter(outs.values()))
        row.update(metrics=per_out, sqnr_db=first["sqnr_db"], cosine=first["cosine"],
                   max_abs=first["max_abs"], task_metric=fn(ref0, out0), task_metric_name=label)
        if model_name == "ppocr_cls" and labels is not None:
            row["cls_label_accuracy"] = ppd.cls_accuracy(out0, labels)
    except Exception as exc:
        row["eval_error"] = f"{type(exc).__name__}: {exc}"[:600]


def bench_model(name: str, args) -> dict:
    """fp32 + peers + qcompile on one zoo model; returns a JSON-able dict."""
    entry = zoo.get(name)
    shape = {k: list(v) for k, v in entry.input_shape.items()}
    shape_arg = peers.shape_arg(shape)
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    _log(f"{name}: fetching model")
    model = zoo.fetch(name)
    _log(f"{name}: data sets in {args.data_dir}")
    sets = ppd.make_sets(name, args.data_dir, det_norm=args.det_norm)
    n_eval = args.eval_samples
    with np.load(sets["eval"]) as z:
        n_eval = min(n_eval or len(z["x"]), len(z["x"]))
    with np.load(sets["calib"]) as z:
        n_calib = len(z[z.files[0]])
    labels = None
    side = sets["eval"].with_suffix(".json")
    if side.is_file():
        lab = json.loads(side.read_text()).get("labels")
        labels = np.asarray(lab[:n_eval]) if lab else None
    _log(f"{name}: fp32 reference on {n_eval} eval samples")
    ref = peers.run_model(model, sets["eval"], limit=n_eval, threads=args.threads)
    score = lambda row, path, outs=None: _score(row, name, path, sets["eval"], ref, n_eval,
                                                args.threads, outs, labels)

    fp32 = dict(method="fp32 (onnxruntime)", key="fp32", status="ok", wall_s=None,
                peak_rss_mb=None, size_mb=peers.model_size_mb(model), out=str(model))
    score(fp32, model, ref)
    rows = [fp32]

    keys = {k.strip() for k in (args.peers or "").split(",") if k.strip()}
    specs = [p for p in peers.PEERS if not keys or p.key in keys]
    act_mb = peers.activation_mb_per_sample(model, shape)
    if str(args.calib_stride) == "auto":
        hist_stride = peers.auto_calib_stride(model, shape, n_calib)
    else:
        hist_stride = int(args.calib_stride) or None
    _log(f"{name}: ~{act_mb:.0f} MB activations/sample; histogram peers use "
         f"{'ORT defaults' if not hist_stride else f'CalibStridedMinMax={hist_stride}'}")
    for spec in specs:
        _log(f"{name}: peer {spec.name}")
        stride = hist_stride if spec.calibrate_method != "MinMax" else None
        r = peers.run_peers(model, sets["calib"], shape, work / "peers", [spec],
                            calib_stride=stride, timeout=args.timeout,
                            hide_torch=not args.peers_see_torch)[0]
        if r["status"] == "ok":
            score(r, r["out"])
        _log(f"  -> {r['status']} {r['wall_s']:.1f}s {r['peak_rss_mb'] or 0:.0f}MB "
             f"sqnr={r.get('sqnr_db', float('nan')):.2f} {r.get('error') or ''}")
        rows.append(r)

    if not args.skip_qcompile:
        _log(f"{name}: qcompile")
        q = run_qcompile(args.python, model, sets["calib"], shape_arg, work / "qcompile",
                         recipe=args.recipe, extra_args=args.extra_args, timeout=args.timeout)
        if q["status"] == "ok":
            score(q, q["out"])
        _log(f"  -> {q['status']} {q['wall_s']:.1f}s {q['peak_rss_mb'] or 0:.0f}MB "
             f"sqnr={q.get('sqnr_db', float('nan')):.2f} {q.get('error') or ''}")
        rows.append(q)

    _log(f"{name}: latency b1, best of 3 passes x {args.latency_runs} runs")
    with CpuWatch() as cw:
        lat = peers.latency_many({i: r["out"] for i, r in enumerate(rows) if r["status"] == "ok"},
                                 shape, batch=1, runs=args.latency_runs, threads=args.threads)
    latency_bg = cw.other_frac
    for i, v in lat.items():
        if isinstance(v, float):
            rows[i]["latency_b1_ms"] = v
        else:
            rows[i]["latency_error"] = v

    return dict(model=name, input_shape=shape_arg, n_eval=n_eval, n_calib=n_calib,
                activation_mb_per_sample=act_mb, hist_calib_stride=hist_stride,
                calib=str(sets["calib"]), eval=str(sets["eval"]), fp32_path=str(model),
                background_cpu_during_latency=latency_bg, rows=rows, summary=_summary(rows))


def _ok(r: dict) -> bool:
    return r["status"] == "ok" and "sqnr_db" in r


def _summary(rows: list[dict]) -> dict:
    fp32 = rows[0]
    peer_rows = [r for r in rows if r["key"] not in ("fp32", "qcompile") and _ok(r)]
    # best by SQNR; near-ties (< 0.05 dB, e.g. u8 vs s8 activations) go to the faster one
    top = max((r["sqnr_db"] for r in peer_rows), default=None)
    best = min((r for r in peer_rows if r["sqnr_db"] >= top - 0.05),
               key=lambda r: r.get("latency_b1_ms") or float("inf"), default=None)
    q = next((r for r in rows if r["key"] == "qcompile"), None)
    f_ms = fp32.get("latency_b1_ms")
    speed = lambda r: (f_ms / r["latency_b1_ms"]) if r and f_ms and r.get("latency_b1_ms") else None
    ratio = lambda a, b: (a / b) if a is not None and b else None
    s = dict(best_peer=best["method"] if best else None,
             best_peer_sqnr_db=best["sqnr_db"] if best else None,
             best_peer_speedup_vs_fp32=speed(best), qcompile_status=q["status"] if q else "skipped")
    if q and _ok(q) and best:
        s.update(compile_time_ratio=ratio(q["wall_s"], best["wall_s"]),
                 rss_ratio=ratio(q["peak_rss_mb"], best["peak_rss_mb"]),
                 sqnr_delta_db=q["sqnr_db"] - best["sqnr_db"],
                 qcompile_speedup_vs_fp32=speed(q),
                 latency_ratio_vs_best_peer=ratio(q.get("latency_b1_ms"), best.get("latency_b1_ms")))
    elif q and q["status"] == "ok" and best:    # compiled but could not be scored
        s.update(compile_time_ratio=ratio(q["wall_s"], best["wall_s"]),
                 rss_ratio=ratio(q["peak_rss_mb"], best["peak_rss_mb"]))
    return s


# ------------------------------------------------------------------ rendering
def _f(v, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, fmt)


def render_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# qcompile vs onnxruntime quantize_static — PP-OCR",
             "",
             f"{meta['date']} · {meta['cpu']} · {meta['nproc']} cores · onnxruntime {meta['onnxruntime']} · "
             f"latency: best of 3 passes of the median of {meta['latency_runs']} runs, {meta['threads']} intra-op threads, "
             f"ORT_ENABLE_ALL · recipe `{meta['recipe']}`"
             + (f" · extra args `{meta['extra_args']}`" if meta.get("extra_args") else "")
             + f" · load avg at start {meta['loadavg_start'][0]:.2f}"
             + (f" · other processes used {100 * meta['background_cpu']:.0f}% of the CPU during the run"
                if meta.get("background_cpu") is not None else "")
             + (" — **timings are contended**" if (meta.get("background_cpu") or 0) > 0.1 else ""), ""]
    for res in results:
        if "error" in res:
            lines += [f"## {res['model']}", "", f"**benchmark failed:** {res['error']}", ""]
            continue
        label = TASK_METRIC[res["model"]][0]
        lines += [f"## {res['model']} (`{res['input_shape']}`, {res['n_eval']} eval / "
                  f"{res['n_calib']} calib samples)", "",
                  f"| method | compile s | peak RSS MB | size MB | SQNR dB | cosine | {label} | latency b1 ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        notes = []
        for r in res["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {_f(r['wall_s'], '.1f')} | {_f(r['peak_rss_mb'], '.0f')} "
                             f"| error | | | | |")
                notes.append(f"- **{r['method']}** failed: {r['error']}")
                continue
            lines.append(f"| {r['method']} | {_f(r['wall_s'], '.1f')} | {_f(r['peak_rss_mb'], '.0f')} | "
                         f"{_f(r['size_mb'], '.2f')} | {_f(r.get('sqnr_db'), '.2f')} | "
                         f"{_f(r.get('cosine'), '.5f')} | {_f(r.get('task_metric'), '.4f')} | "
                         f"{_f(r.get('latency_b1_ms'), '.2f')} |")
            if r.get("default_attempt"):
                d = r["default_attempt"]
                notes.append(f"- **{r['method']}**: with ORT defaults it failed after {d['wall_s']:.0f}s "
                             f"({d['error']}); re-run with `CalibStridedMinMax={r['calib_stride']}`.")
            for k in ("eval_error", "latency_error"):
                if r.get(k):
                    notes.append(f"- **{r['method']}** {k.replace('_', ' ')}: {r[k]}")
        s = res["summary"]
        lines.append("")
        bg = res.get("background_cpu_during_latency")
        if bg is not None and bg > 0.1:
            lines.append(f"⚠ other processes used {100 * bg:.0f}% of the CPU while latency was measured.")
        if s.get("best_peer"):
            lines.append(f"Best quantize_static peer (by SQNR; ties < 0.05 dB to the faster): **{s['best_peer']}** "
                         f"({s['best_peer_sqnr_db']:.2f} dB, speed-up vs fp32 "
                         f"{_f(s['best_peer_speedup_vs_fp32'], '.2f')}×).")
        if s["qcompile_status"] == "ok" and "compile_time_ratio" in s:
            lines.append(f"qcompile / best peer: compile time **{_f(s['compile_time_ratio'], '.2f')}×**, "
                         f"peak RSS **{_f(s.get('rss_ratio'), '.2f')}×**"
                         + (f", SQNR {s['sqnr_delta_db']:+.2f} dB" if 'sqnr_delta_db' in s else "")
                         + (f", latency speed-up vs fp32 **{_f(s.get('qcompile_speedup_vs_fp32'), '.2f')}×**"
                            if 'qcompile_speedup_vs_fp32' in s else "") + ".")
        else:
            lines.append(f"qcompile: {s['qcompile_status']} — no ratios.")
        if res.get("hist_calib_stride"):
            notes.append(f"- *(stride {res['hist_calib_stride']})*: ORT `extra_options="
                         f"{{'CalibStridedMinMax': {res['hist_calib_stride']}}}` (calibrate in chunks). "
                         f"With ORT defaults the histogram calibrators hold every activation of all "
                         f"{res['n_calib']} samples, ~{res['activation_mb_per_sample'] * res['n_calib'] / 1e3:.1f} GB "
                         f"by shape inference, more than this box can spare.")
        if notes:
            lines += ["", *notes]
        lines.append("")
    return "\n".join(lines)


def _meta(args) -> dict:
    return dict(**peers.run_environment(__file__, sys.argv[1:]),
                latency_runs=args.latency_runs, threads=args.threads, recipe=args.recipe,
                extra_args=args.extra_args, quick=args.quick, det_norm=args.det_norm,
                calib_stride=args.calib_stride, qcompile_python=args.python,
                peers_see_torch=args.peers_see_torch,
                loadavg_start=os.getloadavg())


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items() if not k.startswith("_")}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return _jsonable(o.item())
    return o


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma list (default ppocr_det,ppocr_cls; --quick: ppocr_cls)")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--extra-args", default="",
                    help="extra args appended to the qcompile command; write --extra-args=\"--flag x\"")
    ap.add_argument("--json", help="write full results JSON here")
    ap.add_argument("--md", help="write the Markdown report here")
    ap.add_argument("--quick", action="store_true", help="ppocr_cls only, 8 eval samples, 10 latency runs")
    ap.add_argument("--peers", default="", help="subset of peer keys: " + ",".join(p.key for p in peers.PEERS))
    ap.add_argument("--skip-qcompile", action="store_true")
    ap.add_argument("--python", default=sys.executable, help="interpreter used for `-m qcompile`")
    ap.add_argument("--data-dir", default=str(ppd.default_out_dir()))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "qcompile-bench"),
                    help="where peer/qcompile models and logs go")
    ap.add_argument("--det-norm", default="rapidocr", choices=sorted(ppd.DET_NORMS))
    ap.add_argument("--eval-samples", type=int, default=None)
    ap.add_argument("--latency-runs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-stride", default="auto",
                    help="CalibStridedMinMax=N for the Percentile/Entropy peers (chunked calibration; "
                         "MinMax is memory-bounded anyway).  0 = ORT defaults, which keep every "
                         "activation of all calib samples (>20 GB on ppocr_det; a peer killed for "
                         "memory is retried with 8).  auto (default): ORT defaults when that fits in "
                         "35%% of available RAM, else the largest stride that does")
    ap.add_argument("--timeout", type=float, default=3600, help="per compile subprocess, seconds")
    ap.add_argument("--peers-see-torch", action="store_true",
                    help="let the peer subprocesses import torch (onnxruntime.tools imports it "
                         "whenever installed: ~+1 s, ~+250 MB); default hides it")
    args = ap.parse_args(argv)
    if args.quick:
        args.models = args.models or "ppocr_cls"
        args.eval_samples = args.eval_samples or 8
        args.latency_runs = args.latency_runs or 10
    args.models = args.models or "ppocr_det,ppocr_cls"
    args.latency_runs = args.latency_runs or 30

    meta = _meta(args)
    results = []
    with CpuWatch() as cw:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            try:
                results.append(bench_model(name, args))
            except Exception as exc:          # e.g. FetchError: report and go on
                _log(f"{name}: FAILED {type(exc).__name__}: {exc}")
                results.append(dict(model=name, error=f"{type(exc).__name__}: {exc}"))
    meta["background_cpu"] = cw.other_frac
    md = render_markdown(results, meta)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(dict(meta=meta, results=results)), indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
