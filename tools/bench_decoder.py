"""Decoder benchmark: KV-cache int8 recipes on decoders with a KV cache, against the float model.

Why: `tools/bench.py` compiles with pinned shapes and scores one forward pass; a decoder
with a KV cache is used differently -- a prefill, then one-token steps that feed the
`present.*` outputs back as `past_key_values.*` -- and quantizing the cache adds error that
compounds over the steps. This bench compiles each decoder with each recipe (dynamic shapes
kept, as a user would) and reports, in one run on the same box:

* cache bytes per token, float vs compiled (`tools/decode_compare.py cache_bytes_per_token`);
* multi-step decode fidelity (`tools/decode_compare.py compare_decode`): 8 prompts, 16 steps,
  the compiled model forced along the float model's greedy tokens; per step the mean and min
  cosine of the next-token logits and the top-1 agreement;
* qcompile's own verification (`report.json -> verification`: prefill logits SQNR on the
  held-out eval.npz);
* compile wall time (fresh subprocess, `tools/benchlib/measure.py run_measured`) and peak RSS;
* decode step latency: ms per one-token step (batch 1), median, float and compiled in the
  same fresh process with the same session options (ORT_ENABLE_ALL, `--threads` intra-op, 1
  inter-op), alternating whole decode loops of the same prompt (A B, B A, ...) after warm-up
  loops, in `--latency-rounds` fresh session pairs per process (per model the best round), in
  `--latency-passes` fresh processes; the ratio compiled/float is taken within each process and
  the median over processes is reported. A control times the float model against itself the
  same way (the ratio's noise). These models are tiny (hidden 64): a step is ~0.1 ms of
  per-operator overhead, so the ratio says what the added Q/DQ nodes cost, not what a
  memory-bound large decoder would gain from a smaller cache.

Models:

* ``llama_block``: the seeded Llama-style builder (`models/llama_block.py`; 2 layers, 4 heads,
  2 KV heads x 16, vocab 512; synthetic weights with activation-outlier channels).
* ``llama_hf``: a Hugging Face ``LlamaForCausalLM`` with RANDOM weights (transformers'
  initialisation, `models/export_hf.py random_llama`, same geometry) exported with its KV cache
  by the TorchScript exporter; ``llama_hf_dynamo`` the same checkpoint through the dynamo
  exporter. Their ONNX metadata says ``qcompile.export.weights=random`` and qcompile's
  report.json repeats it under ``model_export``; the tables say so. Needs torch + transformers
  (the ``export`` extra). Calibration/eval data: `models/llama_block.sample_inputs` (prefills
  of 16 tokens, half of them right-padded), 32 calibration and 64 eval samples, as the builder
  writes them; ``--calib-seq N`` makes the calibration prefills N tokens long (positions
  0..N-1: the int8 cache scales only see the key/value ranges of the positions calibrated).

Recipes (``--recipes``): any built-in name (default ``w8a8-kv8``: w8a8-smooth linears + int8
KV cache per head) or one of the KV-cache-only recipes this bench writes to ``WORK/recipes``:
``kv8-per-head`` / ``kv8-per-channel`` = ``canonicalize`` then ``kv_cache`` with that
granularity (the linears stay float; ``kv_cache`` calibrates its own scales from ``--calib``).
onnxruntime.quantization has no KV-cache quantization, so there is no peer row.

Usage::

    python tools/bench_decoder.py [--models llama_block,llama_hf,llama_hf_dynamo]
        [--recipes w8a8-kv8,kv8-per-head,kv8-per-channel] [--out docs/benchmarks/decoder]
        [--work DIR] [--calib-seq 16] [--steps 16] [--prompts 8] [--threads 2]
        [--latency-passes 5] [--latency-rounds 4]

Writes OUT/bench.md and OUT/bench.json. Exit code 0, 1 if a compile or a decode failed
(an error row; the run goes on), 3 if a model could not be set up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchlib import decoder, latency, measure  # noqa: E402
from benchlib.decoder import CALIB_SAMPLES, DEFAULT_MODELS, DEFAULT_RECIPES, EVAL_SAMPLES, KV_ONLY, SEED  # noqa: E402


def _log(msg: str) -> None:
    print(f"[bench_decoder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _step_latency(python: str, float_model: str, compiled: str, args) -> dict:
    return latency.decode_step_latency(python, float_model, compiled, threads=args.threads,
                                       prompt_len=args.latency_prompt, steps=args.latency_steps,
                                       loops=args.latency_loops, warmup_loops=args.latency_warmup_loops,
                                       rounds=args.latency_rounds, passes=args.latency_passes, seed=SEED)


def _meta(args, argv: list[str]) -> dict:
    return dict(**measure.run_environment(__file__, argv),
                models=args.model_list, recipes=args.recipe_list, steps=args.steps, prompts=args.prompts,
                threads=args.threads, latency_prompt=args.latency_prompt, latency_steps=args.latency_steps,
                latency_loops=args.latency_loops, latency_warmup_loops=args.latency_warmup_loops,
                latency_passes=args.latency_passes, latency_rounds=args.latency_rounds,
                calib_samples=CALIB_SAMPLES, eval_samples=EVAL_SAMPLES,
                calib_seq=args.calib_seq,
                seed=SEED, loadavg_start=os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated: " + ", ".join(DEFAULT_MODELS))
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help="comma-separated built-in recipes and/or " + ", ".join(KV_ONLY))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "decoder"))
    ap.add_argument("--work", default=None, help="keep models, compiled artifacts and logs here (default: a temp dir)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for qcompile, setup and latency children")
    ap.add_argument("--calib-seq", type=int, default=16,
                    help="tokens per calibration prefill (sample_inputs' default 16; eval.npz stays 16)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps compared with float (step 0 = prefill)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-prompt", type=int, default=32, help="prompt tokens before the timed steps")
    ap.add_argument("--latency-steps", type=int, default=32, help="timed one-token steps per decode loop")
    ap.add_argument("--latency-loops", type=int, default=10, help="timed decode loops per model and process")
    ap.add_argument("--latency-warmup-loops", type=int, default=2)
    ap.add_argument("--latency-rounds", type=int, default=4,
                    help="fresh float + compiled sessions per process; per model the best round counts")
    ap.add_argument("--latency-passes", type=int, default=5, help="fresh processes per compiled model")
    ap.add_argument("--timeout", type=float, default=900, help="per compile, seconds")
    args = ap.parse_args(argv)
    args.model_list = [m for m in args.models.split(",") if m]
    args.recipe_list = [r for r in args.recipes.split(",") if r]
    meta = _meta(args, argv)
    t_start = time.perf_counter()
    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="qc-bench-decoder-")
        work = Path(tmp)
    rc = 0
    setups, rows = [], []
    try:
        for name in args.model_list:
            _log(f"setting up {name}")
            s = decoder.setup_decoder(name, work, args.python, args.calib_seq)
            setups.append(s)
            if s["status"] != "ok":
                _log(f"  {s['error']}")
                rc = max(rc, 3)
                continue
            _log(f"{name}: latency control (float against itself)")
            s["latency_control"] = _step_latency(args.python, s["model"], s["model"], args)
            for recipe in args.recipe_list:
                _log(f"{name}: compiling {recipe}")
                row = decoder.run_compile(s, recipe, work, args.python, args.timeout)
                rows.append(row)
                if row["status"] != "ok":
                    _log(f"  error: {row['error']}")
                    rc = max(rc, 1)
                    continue
                _log(f"  {row['compile_s']:.1f} s; decode vs float ({args.steps} steps, {args.prompts} prompts)")
                try:
                    row["decode"] = decoder.decode_fidelity(s["model"], row["artifact"], args.steps, args.prompts)
                except Exception as exc:  # a compiled model that cannot decode is a qcompile failure
                    row.update(status="error", error=f"decode_compare: {type(exc).__name__}: {exc}")
                    rc = max(rc, 1)
                    continue
                _log(f"  worst-step cosine {row['decode']['worst_step_cosine_mean']:.6f}; step latency")
                row["latency"] = _step_latency(args.python, s["model"], row["artifact"], args)
                if row["latency"].get("error"):
                    _log(f"  latency error: {row['latency']['error']}")
                else:
                    _log(f"  step {row['latency']['float_ms']:.3f} / {row['latency']['compiled_ms']:.3f} ms, "
                         f"x{row['latency']['ratio']:.2f}")
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(measure.jsonable(dict(meta=meta, models=setups, rows=rows)), indent=1)
                                        + "\n")
        (out / "bench.md").write_text(decoder.render_markdown(setups, rows, meta))
        _log(f"wrote {out / 'bench.md'} and bench.json ({meta['wall_s']:.0f} s)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
