"""The qcompile benchmark: every model x recipe x target against onnxruntime.quantization, one run.

Why: one command answers "what does qcompile give me that onnxruntime's own quantizers do
not?" -- compile cost (wall time, peak RSS), model size, accuracy (task metric and SQNR
against fp32 on held-out data) and onnxruntime CPU latency at batch 1 and 16 -- with every
number taken in the same run on the same data, and every qcompile number also given as a
ratio to the peer it is compared with (a shared 2-core box makes absolute timings noisy;
ratios taken minutes apart on the same box are much less so).

Methods per model (each compile in a fresh, measured subprocess; see tools/benchlib/measure.py
``run_measured``):

* ``qcompile <recipe>`` for each recipe (any built-in: ``qcompile.recipe.builtin_recipes()``;
  default ``w8a8``, ``w8a16``), target ``cpu``, invoked as a user would: ``python -m qcompile
  MODEL --target cpu --recipe R --calib CALIB --input-shape NAME:1,... -o OUT --no-verify -q``.
  For the batch-16 latency column a second artifact is compiled with the batch dimension
  pinned to 16 (same calibration data); its compile time and RSS are in the JSON, not in the
  table.
* peers, each compared with the recipes in its ``Peer.versus`` that are in the run (the table's
  ratio columns use the first; the per-recipe table and the JSON have every pair):

  - ``w8a8``: ``quantize_static`` (QDQ, per-channel, U8 activations / S8 weights; MinMax,
    Percentile, Entropy; on transformers also ``op_types_to_quantize=["MatMul"]``; S8 activations
    only when named with ``--peers static-s8-minmax,...``);
  - ``w8a8-dynamic`` (and ``w8a8``): ``quantize_dynamic`` (per-channel S8 weights);
  - ``w8a8-smooth`` (and ``w8a8``; transformers): ``quantize_static`` MinMax with
    ``extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5}`` -- onnxruntime's SmoothQuant,
    which needs Intel neural-compressor (an error row where it is not installed);
  - ``w4a16`` (and ``w8a16``, ``w4a16-awq``, ``w4a16-gptq``): ``MatMulNBitsQuantizer`` int4 RTN block 32;
  - ``w4a16-gptq`` (and ``w4a16-awq``, ``w4a16``): ``MatMulNBitsQuantizer`` int4 block 32 with
    ``GPTQWeightOnlyQuantConfig`` on the same calibration data (its child may import torch:
    onnxruntime's GPTQ code needs it);
  - ``w8a16``: ``MatMulNBitsQuantizer`` int8 block 32 (``DefaultWeightOnlyQuantConfig``);
  - ``w4a8``: int4 RTN block 32 with ``accuracy_level=4`` (MatMulNBits computing in int8, what
    qcompile's w4a8 lowers MatMul to on cpu);
  - ``fp8``: ``quantize_static`` with E4M3FN weights and activations (per-channel, QDQ;
    onnxruntime accepts only ``CalibrationMethod.Distribution`` for float8), also ``[MatMul]``
    on transformers.  onnxruntime CPU cannot load that model at ORT_ENABLE_EXTENDED or above
    (its QDQ fusion makes QLinearConv/QLinearMatMul with float8 inputs), so such a peer is
    evaluated and timed at the highest level that loads, and its row says so.

  MatMulNBits covers MatMul only: on the CNNs those peers do not apply and say so.
  ``w4a4`` and ``w8a8-mix`` have no onnxruntime peer: the per-recipe table compares them (and
  any recipe whose peers did not run) with qcompile ``w8a8``.

The catalog is tools/benchlib/peers.py ``PEERS``; accuracy is qcompile verify's metrics (SQNR over
all samples, mean per-sample cosine) plus the model's task metric (tools/benchlib/evaluate.py).

All peers start from the same prepared model (non-batch input dims pinned, batch axis
left symbolic, opset >= 13), so one peer artifact serves both latency columns.

A peer that crashes, runs out of memory or time is an error row with its message; the
run goes on.  Exit code: 0, or 1 if a qcompile compile failed or its output could not be
run, or 3 if a model could not be set up (fetch/export).  Peers never fail the run.

Usage::

    python tools/bench.py [--models ppocr_det,ppocr_cls,minilm,small_cnn,bert_block]
        [--recipes w8a8,w8a16,...] [--out DIR] [--quick] [--eval-samples N] [--latency-runs N]

``--quick``: small_cnn (built locally: no download, no torch), recipes w8a8, w8a16,
w8a8-dynamic, w4a16, peers static MinMax + dynamic + MatMulNBits int4 (n/a there), 16 eval
samples, 2 latency passes of 10 runs; writes to build/bench-quick unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import measure, peers, render, suite  # noqa: E402
from benchlib.setups import DEFAULT_MODELS  # noqa: E402

DEFAULT_RECIPES = ("w8a8", "w8a16")
QUICK_RECIPES = ("w8a8", "w8a16", "w8a8-dynamic", "w4a16")


def known_recipes() -> list[str]:
    """Every built-in qcompile recipe (the default pair when qcompile cannot be imported here)."""
    try:
        from qcompile.recipe_files import builtin_recipes
        return sorted(builtin_recipes())
    except Exception:
        return list(DEFAULT_RECIPES)


# ------------------------------------------------------------------------ meta
def _meta(args, argv: list[str]) -> dict:
    return dict(**measure.run_environment(__file__, argv),
                models=args.model_list, recipes=args.recipe_list, quick=args.quick, threads=args.threads,
                latency_runs=args.latency_runs, latency_passes=args.latency_passes, latency_warmup=5,
                latency_pass_budget=args.latency_pass_budget, latency_quiet=args.latency_quiet,
                latency_max_passes=args.latency_max_passes or 3 * args.latency_passes,
                eval_samples=args.eval_samples, peers=args.peer_keys or "all applicable",
                calib_stride=args.calib_stride, qcompile_python=args.python, peers_see_torch=args.peers_see_torch,
                no_b16=args.no_b16,
                loadavg_start=os.getloadavg())


# ------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Results: DIR/bench.md, DIR/bench.json, DIR/bench.png.")
    ap.add_argument("--models", default=None, help=f"comma list (default {','.join(DEFAULT_MODELS)})")
    ap.add_argument("--recipes", default=None,
                    help=f"comma list of built-in recipes ({','.join(known_recipes())}); default "
                         f"{','.join(DEFAULT_RECIPES)}, --quick: {','.join(QUICK_RECIPES)}")
    ap.add_argument("--out", default=None, help="results folder (default docs/benchmarks; --quick: build/bench-quick)")
    ap.add_argument("--quick", action="store_true",
                    help=f"small_cnn only, recipes {','.join(QUICK_RECIPES)}, peers {','.join(peers.QUICK_PEERS)}, "
                         "16 eval samples, 2 latency passes of 10 runs")
    ap.add_argument("--eval-samples", type=int, default=None, help="limit the held-out samples (default: all)")
    ap.add_argument("--latency-runs", type=int, default=None, help="timed runs per pass (default 30; 0 = no latency)")
    ap.add_argument("--latency-passes", type=int, default=None,
                    help="passes over all models; best pass kept (default 3; --quick: 2)")
    ap.add_argument("--latency-pass-budget", type=float, default=150.0,
                    help="seconds per model per pass; a slower model gets fewer runs, at least 10, in one pass (default 150)")
    ap.add_argument("--latency-quiet", type=float, default=0.10,
                    help="a latency pass counts as quiet when other processes used less than this share of the "
                         "box during its timed runs; only quiet passes are kept when there are any (default 0.10)")
    ap.add_argument("--latency-max-passes", type=int, default=None,
                    help="passes a model may get while waiting for a quiet one (default 3 x --latency-passes)")
    ap.add_argument("--peers", default="", help="subset of peer keys: " + ",".join(peers.PEER_BY_KEY))
    ap.add_argument("--no-b16", action="store_true", help="skip the batch-16 artifacts and latency column")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for `-m qcompile` and the peers")
    ap.add_argument("--work", default=None, help="keep artifacts and logs here (default: a temp dir, removed)")
    ap.add_argument("--data-dir", default=None, help="data cache (default $QCOMPILE_CACHE/data)")
    ap.add_argument("--calib-stride", default="auto",
                    help="CalibStridedMinMax for the Percentile/Entropy static peers: auto (default: ORT defaults "
                         "when all calibration activations fit in 35%% of available RAM), 0 = ORT defaults, or N")
    ap.add_argument("--oom-retry-stride", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=3600, help="per compile subprocess, seconds")
    ap.add_argument("--peers-see-torch", action="store_true",
                    help="let peer subprocesses import torch (default hides it: onnxruntime.tools imports it merely because it is installed)")
    args = ap.parse_args(argv)

    if args.quick:
        args.models = args.models or "small_cnn"
        args.recipes = args.recipes or ",".join(QUICK_RECIPES)
        args.eval_samples = args.eval_samples or 16
        args.latency_runs = 10 if args.latency_runs is None else args.latency_runs
        args.latency_passes = 2 if args.latency_passes is None else args.latency_passes
        args.peers = args.peers or ",".join(peers.QUICK_PEERS)
    args.model_list = [m.strip() for m in (args.models or ",".join(DEFAULT_MODELS)).split(",") if m.strip()]
    args.recipe_list = [r.strip() for r in (args.recipes or ",".join(DEFAULT_RECIPES)).split(",") if r.strip()]
    args.peer_keys = [k.strip() for k in args.peers.split(",") if k.strip()]
    args.latency_runs = 30 if args.latency_runs is None else args.latency_runs
    args.latency_passes = 3 if args.latency_passes is None else args.latency_passes
    bad = [k for k in args.peer_keys if k not in peers.PEER_BY_KEY]
    bad_m = [m for m in args.model_list if m not in DEFAULT_MODELS]
    bad_r = [r for r in args.recipe_list if r not in known_recipes()]
    if bad or bad_m or bad_r:
        ap.error(f"unknown peers {bad} / models {bad_m} / recipes {bad_r}")
    out_dir = Path(args.out or (ROOT / ("build/bench-quick" if args.quick else "docs/benchmarks")))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:
        from models import zoo
        args.data_dir = str(zoo.cache_root() / "data")
    tmp_work = None
    if args.work is None:
        tmp_work = tempfile.mkdtemp(prefix="qcompile-bench-")
        args.work = tmp_work

    meta = _meta(args, argv)
    t0 = time.perf_counter()
    results = []
    try:
        with measure.CpuWatch() as cw:
            for name in args.model_list:
                try:
                    results.append(suite.bench_model(name, args))
                except Exception as exc:          # FetchError, export failure, ...: report and go on
                    suite.log(f"{name}: FAILED {type(exc).__name__}: {exc}")
                    traceback.print_exc()
                    results.append(dict(model=name, error=f"{type(exc).__name__}: {exc}"[:800]))
    finally:
        if tmp_work:
            shutil.rmtree(tmp_work, ignore_errors=True)
    meta["background_cpu"] = cw.other_frac
    meta["wall_s"] = time.perf_counter() - t0
    report = next((r["report"] for res in results for r in res.get("rows", []) if r.get("report")), None)
    meta["cpu_variant"] = f"cpu:{report['target_variant']}" if report and report.get("target_variant") else None
    md = render.render_markdown(results, meta)
    (out_dir / "bench.md").write_text(md)
    (out_dir / "bench.json").write_text(json.dumps(measure.jsonable(dict(meta=meta, results=results)), indent=1))
    perr = render.render_plot(results, out_dir / "bench.png")
    print(md)
    suite.log(f"wrote {out_dir / 'bench.md'}, bench.json" + (f"; {perr}" if perr else ", bench.png")
         + f" in {meta['wall_s']:.0f} s")
    qc_fail = [f for r in results for f in r.get("qcompile_failures", [])]
    for f in qc_fail:
        suite.log(f"qcompile failure: {f}")
    if qc_fail:
        return 1
    return 3 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
