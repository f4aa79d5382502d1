"""One model's benchmark: fp32, every peer compared with the recipes asked for, every qcompile
recipe (batch 1 and a batch-16 artifact), their latency, then the ratios and deltas of each
qcompile row against the rows it is compared with, and the acceptance bars."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from . import evaluate, latency, peers
from .compiles import run_qcompile
from .measure import CpuWatch, is_mem_kill, model_size_mb
from .setups import has_const_matmul, npz_len, setup_model

BATCH_B16 = 16
# Acceptance bars checked per model when both rows ran: recipe -> (peer key, size tolerance).
# Fidelity holds when the task metric and SQNR are both >= the peer's; size when |qc/peer - 1| <= tol.
BARS = {"w4a16": ("nbits4-rtn", 0.05), "w4a16-awq": ("nbits4-rtn", 0.05), "w4a16-gptq": ("nbits4-rtn", 0.05)}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ratio(a, b):
    return a / b if a is not None and b else None

def _short(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {(r.get('error') or '')[:160]}"
    return (f"ok {r['wall_s']:.1f}s {r['peak_rss_mb'] or 0:.0f}MB {r['size_mb']:.2f}MB "
            f"sqnr={r.get('sqnr_db', float('nan')):.2f} {r.get('eval_error') or ''}")


def batch_fixed(model_path) -> bool:
    """Whether the model's first input pins its batch axis to 1 (ddddocr's detector): a batch-16
    artifact cannot exist, which is not a compile failure."""
    import onnx
    first = onnx.load(str(model_path), load_external_data=False).graph.input[0]
    dims = first.type.tensor_type.shape.dim
    return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1


def bench_model(name: str, args) -> dict:
    work = Path(args.work) / name
    log(f"{name}: setting up")
    setup = setup_model(name, work, args)
    shapes = setup.shapes
    shapes16 = {k: [BATCH_B16, *v[1:]] for k, v in shapes.items()}
    n_calib = npz_len(setup.calib)
    names = list(shapes)
    eval_inputs = evaluate.load_inputs(setup.eval, names, args.eval_samples)
    n_eval = len(eval_inputs[names[0]])
    log(f"{name}: fp32 reference on {n_eval} eval samples ({n_calib} calibration samples)")
    ref = evaluate.run_model(setup.model, eval_inputs, threads=args.threads)

    fp32 = dict(key="fp32", method="fp32 (onnxruntime)", kind="fp32", versus=None, status="ok",
                wall_s=None, peak_rss_mb=None, size_mb=model_size_mb(setup.model), out=str(setup.model))
    evaluate.score(fp32, setup.metric, setup.model, eval_inputs, ref, args.threads, outs=ref)
    more = {}                       # label -> (inputs, fp32 outputs): every row is scored on these too
    for label, npz in setup.more_sets.items():
        inputs = evaluate.load_inputs(npz, names, args.eval_samples)
        more[label] = (inputs, evaluate.run_model(setup.model, inputs, threads=args.threads))
    rows = [fp32]

    recipes = args.recipe_list
    selected = [p for p in peers.PEERS if set(p.versus) & set(recipes)
                and (p.key in args.peer_keys if args.peer_keys else not p.optional)
                and (setup.family == "transformer" or not p.transformers_only)]
    act_mb = peers.activation_mb_per_sample(setup.model, shapes)
    hist_stride = peers.auto_calib_stride(setup.model, shapes, n_calib) if args.calib_stride == "auto" \
        else (int(args.calib_stride) or None)
    has_mm = has_const_matmul(setup.model)
    for p in selected:
        vs_all = [f"qcompile {v}" for v in p.versus if v in recipes]
        base = dict(key=p.key, method=p.name, kind=p.kind, versus=vs_all[0], versus_all=vs_all)
        if p.kind == "nbits" and not has_mm:
            rows.append(dict(base, status="n/a", wall_s=None, peak_rss_mb=None, size_mb=None, out=None,
                             error="no MatMul with a constant 2-D weight: MatMulNBits has nothing to quantize "
                                   "(it covers MatMul only, not Conv/Gemm)"))
            log(f"{name}: peer {p.name}: n/a (no constant-weight MatMul)")
            continue
        stride = hist_stride if p.kind in ("static", "fp8") and p.method != "MinMax" else None
        log(f"{name}: peer {p.name}" + (f" (CalibStridedMinMax={stride})" if stride else ""))
        kw = dict(timeout=args.timeout, python=args.python, hide_torch=not args.peers_see_torch)
        out = work / "peers" / f"{p.key}.onnx"
        r = peers.run_peer(p, setup.model, setup.calib, shapes, out, stride=stride, **kw)
        row = dict(base, calib_stride=stride, **r)
        if stride:
            row["method"] += f" (stride {stride})"
        if r["status"] != "ok" and p.kind in ("static", "fp8") and not stride and is_mem_kill(r):
            log(f"  killed for memory; retrying with CalibStridedMinMax={args.oom_retry_stride}")
            r2 = peers.run_peer(p, setup.model, setup.calib, shapes, out, stride=args.oom_retry_stride, **kw)
            first = {k: r[k] for k in ("status", "wall_s", "peak_rss_mb", "error")}
            row = dict(base, calib_stride=args.oom_retry_stride, default_attempt=first, **r2)
            row["method"] += f" (stride {args.oom_retry_stride})"
        if row["status"] == "ok":
            level, tried = evaluate.loadable_level(row["out"], args.threads)
            if level is None:
                row.update(status="error", error="onnxruntime CPU cannot load the model at any graph optimization "
                                                 "level: " + " | ".join(tried)[:900])
            else:
                if level != evaluate.ORT_LEVELS[0]:
                    # The only way to run it: evaluation and latency at a lower level, said in the row.
                    row.update(ort_level=level, ort_level_errors=tried)
                    row["method"] += f" (runs at {level})"
                evaluate.score(row, setup.metric, row["out"], eval_inputs, ref, args.threads, level=level)
                evaluate.score_sets(row, setup.metric, row["out"], more, args.threads, level=level)
        log(f"  -> {_short(row)}")
        rows.append(row)

    qc_fail = []
    for recipe in recipes:
        log(f"{name}: qcompile {recipe}")
        q = run_qcompile(args.python, setup.model, setup.calib, shapes, work / f"qcompile-{recipe}", recipe,
                         timeout=args.timeout)
        q.update(key=f"qcompile-{recipe}", method=f"qcompile {recipe}", kind="qcompile", recipe=recipe, versus=None)
        if q["status"] == "ok":
            evaluate.score(q, setup.metric, q["out"], eval_inputs, ref, args.threads)
            evaluate.score_sets(q, setup.metric, q["out"], more, args.threads)
            if q.get("eval_error"):
                qc_fail.append(f"{name} qcompile {recipe}: output could not be evaluated: {q['eval_error']}")
        else:
            qc_fail.append(f"{name} qcompile {recipe}: {q['error']}")
        log(f"  -> {_short(q)}")
        if q["status"] == "ok" and not args.no_b16 and batch_fixed(setup.model):
            q["b16_artifact"] = {"status": "n/a", "error": "the model's graph fixes batch 1 (no batch-16 artifact)"}
        elif q["status"] == "ok" and not args.no_b16:
            log(f"{name}: qcompile {recipe} batch-{BATCH_B16} artifact")
            q16 = run_qcompile(args.python, setup.model, setup.calib, shapes16,
                               work / f"qcompile-{recipe}-b{BATCH_B16}", recipe, timeout=args.timeout)
            q["b16_artifact"] = {k: q16.get(k) for k in ("status", "wall_s", "peak_rss_mb", "size_mb", "out",
                                                         "error", "command")}
            if q16["status"] != "ok":
                qc_fail.append(f"{name} qcompile {recipe} batch {BATCH_B16}: {q16['error']}")
            log(f"  -> {_short(q16)}")
        rows.append(q)

    bg = {}
    if args.latency_runs > 0:
        lat_kw = dict(runs=args.latency_runs, threads=args.threads, passes=args.latency_passes,
                      pass_budget_s=args.latency_pass_budget, python=args.python, quiet=args.latency_quiet,
                      max_passes=args.latency_max_passes,
                      levels={i: r["ort_level"] for i, r in enumerate(rows) if r.get("ort_level")})
        with CpuWatch() as cw1:
            log(f"{name}: latency b1 (best of {args.latency_passes} passes x median of {args.latency_runs} runs)")
            lat1 = latency.latency_many({i: r["out"] for i, r in enumerate(rows) if r["status"] == "ok"},
                                shapes, batch=1, **lat_kw)
        bg["b1"] = cw1.other_frac
        lat16 = {}
        if not args.no_b16:
            paths16 = {}
            for i, r in enumerate(rows):
                if r["status"] != "ok":
                    continue
                if r["kind"] == "qcompile":
                    b = r.get("b16_artifact") or {}
                    if b.get("status") == "ok":
                        paths16[i] = b["out"]
                else:
                    paths16[i] = r["out"]
            with CpuWatch() as cw16:
                log(f"{name}: latency b{BATCH_B16}")
                lat16 = latency.latency_many(paths16, shapes, batch=BATCH_B16, **lat_kw)
            bg["b16"] = cw16.other_frac
        for b, lat in (("b1", lat1), ("b16", lat16)):
            for i, v in lat.items():
                if isinstance(v, dict):
                    rows[i][f"latency_{b}_ms"] = v["ms"]
                    rows[i][f"latency_{b}_other_cpu"] = v.get("other")
                    rows[i][f"latency_{b}_quiet"] = v.get("quiet")
                    rows[i][f"latency_{b}_passes_done"] = v["passes"]
                    if v["runs"] < args.latency_runs:
                        rows[i][f"latency_{b}_runs"] = v["runs"]
                        rows[i][f"latency_{b}_passes"] = v["passes"]
                else:
                    rows[i][f"latency_{b}_error"] = v

    _ratios(rows)
    return dict(bars=bars(rows), model=name, family=setup.family, metric=setup.metric, input_shape=evaluate.shape_arg(shapes),
                n_eval=n_eval, n_calib=n_calib, activation_mb_per_sample=act_mb, hist_calib_stride=hist_stride,
                fp32_path=str(setup.model), calib=str(setup.calib), eval=str(setup.eval), notes=setup.notes,
                more_sets={k: str(v) for k, v in setup.more_sets.items()},
                background_cpu_during_latency=bg, rows=rows, summary=_summary(rows),
                qcompile_failures=qc_fail)


def _vs(q: dict, r: dict) -> dict:
    """qcompile row ``q`` against row ``r`` (a peer, or qcompile w8a8): ratios q / r for compile
    time, RSS, size and latency (< 1: q is faster / smaller), deltas q - r for the accuracy."""
    fin = lambda d, k: k in d and d[k] is not None and math.isfinite(d[k])  # noqa: E731
    return dict(
        compile_time=_ratio(q["wall_s"], r["wall_s"]), peak_rss=_ratio(q["peak_rss_mb"], r["peak_rss_mb"]),
        size=_ratio(q["size_mb"], r["size_mb"]),
        latency_b1=_ratio(q.get("latency_b1_ms"), r.get("latency_b1_ms")),
        latency_b16=_ratio(q.get("latency_b16_ms"), r.get("latency_b16_ms")),
        sqnr_delta_db=(q["sqnr_db"] - r["sqnr_db"]) if fin(q, "sqnr_db") and fin(r, "sqnr_db") else None,
        cosine_delta=(q["cosine"] - r["cosine"]) if fin(q, "cosine") and fin(r, "cosine") else None,
        task_metric_delta=(q["task_metric"] - r["task_metric"]) if "task_metric" in q and "task_metric" in r
        else None)

def versus_all(r: dict) -> list[str]:
    return r.get("versus_all") or ([r["versus"]] if r.get("versus") else [])

def _ratios(rows: list[dict]) -> None:
    """Speed-ups vs fp32 on every row; on peer rows, qcompile / peer for time, RSS, size and
    latency and the accuracy deltas (qcompile - peer): ``vs_qcompile`` against the first
    recipe it is compared with (the table's ratio columns), ``vs_qcompile_all`` against each.
    On qcompile rows other than w8a8: ``vs_w8a8``, the same against qcompile w8a8."""
    fp32 = rows[0]
    for r in rows:
        for b in ("b1", "b16"):
            f, x = fp32.get(f"latency_{b}_ms"), r.get(f"latency_{b}_ms")
            r[f"speedup_{b}"] = f / x if f and x else None
    qc = {r["method"]: r for r in rows if r["kind"] == "qcompile"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["kind"] == "qcompile":
            w = qc.get("qcompile w8a8")
            if w is not None and w is not r and w["status"] == "ok":
                r["vs_w8a8"] = _vs(r, w)
            continue
        all_ = {m: _vs(qc[m], r) for m in versus_all(r) if m in qc and qc[m]["status"] == "ok"}
        if all_:
            r["vs_qcompile_all"] = all_
            if r.get("versus") in all_:
                r["vs_qcompile"] = all_[r["versus"]]

def _summary(rows: list[dict]) -> dict:
    """Per qcompile recipe: the best peer compared with it (by SQNR; ties < 0.05 dB go to the faster)."""
    out = {}
    for q in (r for r in rows if r["kind"] == "qcompile"):
        cands = [r for r in rows if q["method"] in versus_all(r) and r["status"] == "ok" and "sqnr_db" in r]
        s = dict(qcompile_status=q["status"])
        if cands:
            top = max(r["sqnr_db"] for r in cands)
            best = min((r for r in cands if r["sqnr_db"] >= top - 0.05),
                       key=lambda r: r.get("latency_b1_ms") or float("inf"))
            s.update(best_peer=best["method"], best_peer_sqnr_db=best["sqnr_db"],
                     best_peer_task_metric=best.get("task_metric"),
                     best_peer_speedup_b1=best.get("speedup_b1"), best_peer_speedup_b16=best.get("speedup_b16"))
            s.update((best.get("vs_qcompile_all") or {}).get(q["method"], {}))
        s.update(qcompile_sqnr_db=q.get("sqnr_db"), qcompile_task_metric=q.get("task_metric"),
                 qcompile_speedup_b1=q.get("speedup_b1"), qcompile_speedup_b16=q.get("speedup_b16"),
                 qcompile_size_mb=q.get("size_mb"))
        out[q["method"]] = s
    return out


def bars(rows: list[dict]) -> dict:
    """BARS checked on this model's rows (recipe -> peer, whether fidelity and size hold)."""
    out = {}
    for recipe, (pkey, tol) in BARS.items():
        q = next((r for r in rows if r.get("key") == f"qcompile-{recipe}" and r["status"] == "ok"), None)
        pr = next((r for r in rows if r.get("key") == pkey and r["status"] == "ok"), None)
        if not q or not pr or "task_metric" not in q or "task_metric" not in pr:
            continue
        fid = q["task_metric"] >= pr["task_metric"] and q.get("sqnr_db", -1e9) >= pr.get("sqnr_db", 1e9)
        out[recipe] = dict(peer=pr["method"], peer_key=pkey, tolerance=tol, fidelity_holds=fid,
                           size_holds=abs(q["size_mb"] / pr["size_mb"] - 1) <= tol,
                           size_ratio=q["size_mb"] / pr["size_mb"])
    return out
