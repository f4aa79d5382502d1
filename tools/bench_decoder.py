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
* compile wall time (fresh subprocess, `tools/peers.py run_measured`) and peak RSS;
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
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sibling import load as _load  # noqa: E402

peers = _load("qc_peers", ROOT / "tools" / "peers.py")

DEFAULT_MODELS = ("llama_block", "llama_hf", "llama_hf_dynamo")
DEFAULT_RECIPES = ("w8a8-kv8", "kv8-per-head", "kv8-per-channel")
KV_ONLY = {"kv8-per-head": "per_head", "kv8-per-channel": "per_channel"}
CALIB_SAMPLES, EVAL_SAMPLES, SEED = 32, 64, 0


def _log(msg: str) -> None:
    print(f"[bench_decoder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ recipes

def kv_only_recipe(name: str, granularity: str) -> str:
    return (f"apiversion: qcompile/v1\n"
            f"metadata: {{name: {name}, description: 'int8 KV cache only ({granularity}); linears stay float'}}\n"
            f"spec:\n  passes:\n    - type: canonicalize\n    - type: kv_cache\n"
            f"      granularity: {granularity}\n")


def recipe_arg(recipe: str, work: Path) -> str:
    """The --recipe argument: a built-in name, or the path of the KV-only YAML written to WORK/recipes."""
    if recipe not in KV_ONLY:
        return recipe
    path = work / "recipes" / f"{recipe}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(kv_only_recipe(recipe, KV_ONLY[recipe]))
    return str(path)


# ------------------------------------------------------------------- models

_HF_SETUP = """
import sys
sys.path.insert(0, {root!r})
from models.export_hf import random_llama, export_causal_lm
ckpt = {ckpt!r}
import os
if not os.path.exists(os.path.join(ckpt, 'config.json')):
    random_llama(ckpt, seed={seed})
export_causal_lm(ckpt, {out!r}, dynamo={dynamo})
"""


def write_data(d: Path, calib_seq: int) -> None:
    """calib.npz / eval.npz as llama_block.write() makes them (seeds SEED+1, SEED+2); the
    calibration prefills `calib_seq` tokens long (the builder's own: 16), eval always 16."""
    lb = _load("qc_llama_block", ROOT / "models" / "llama_block.py")
    np.savez(d / "calib.npz", **lb.sample_inputs(CALIB_SAMPLES, SEED + 1, seq=calib_seq))
    np.savez(d / "eval.npz", **lb.sample_inputs(EVAL_SAMPLES, SEED + 2))


def setup_model(name: str, work: Path, python: str, calib_seq: int = 16) -> dict:
    """Build or export the float model with calib.npz / eval.npz under WORK/NAME."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    if name == "llama_block":
        cmd = [python, str(ROOT / "models" / "llama_block.py"), str(d)]
        model = d / "llama_block.onnx"
        source = "models/llama_block.py (seeded builder, synthetic weights)"
    elif name in ("llama_hf", "llama_hf_dynamo"):
        dynamo = name.endswith("dynamo")
        model = d / f"{name}.onnx"
        code = _HF_SETUP.format(root=str(ROOT), ckpt=str(work / "llama_hf_ckpt"), seed=SEED, out=str(model),
                                dynamo=dynamo)
        cmd = [python, "-c", code]
        source = (f"transformers LlamaForCausalLM, RANDOM weights (export_hf.random_llama seed {SEED}), "
                  f"{'dynamo' if dynamo else 'TorchScript'} export (export_hf.export_causal_lm)")
    else:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(DEFAULT_MODELS)}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    (d / "setup.log").write_text(f"$ {shlex.join(cmd[:2])} ...\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    if r.returncode != 0 or not model.exists():
        tail = " | ".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-4:])
        return dict(name=name, status="error", error=f"setup failed (exit {r.returncode}): {tail[-600:]}",
                    source=source)
    write_data(d, calib_seq)
    import onnx
    m = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    past = [i for i in m.graph.input if i.name.startswith("past_key_values.")]
    dims = [d_.dim_value or d_.dim_param for d_ in past[0].type.tensor_type.shape.dim] if past else []
    return dict(name=name, status="ok", model=str(model), calib=str(d / "calib.npz"), eval=str(d / "eval.npz"),
                source=source, setup_s=round(wall, 2), nodes=len(m.graph.node),
                opset=next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
                weights=meta.get("qcompile.export.weights", "seeded builder"),
                cache_tensors=len(past), cache_dims=dims, size_mb=round(peers.model_size_mb(model), 3))


# ------------------------------------------------------------------ compile

def qcompile_command(python: str, model, recipe: str, calib, eval_npz, out_dir) -> list[str]:
    return [python, "-m", "qcompile", str(model), "--target", "cpu", "--recipe", recipe, "--calib", str(calib),
            "--verify-data", str(eval_npz), "-o", str(out_dir), "-q"]


def run_compile(setup: dict, recipe: str, work: Path, python: str, timeout: float) -> dict:
    out = work / setup["name"] / f"out-{recipe}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = qcompile_command(python, setup["model"], recipe_arg(recipe, work), setup["calib"], setup["eval"], out)
    cwd = work / setup["name"]          # a crash writes qcompile-crash.log here, not into the checkout
    res = peers.run_measured(cmd, timeout=timeout, cwd=str(cwd), log_path=cwd / f"{recipe}.log")
    row = dict(model=setup["name"], recipe=recipe, command=shlex.join(cmd), compile_s=round(res["wall_s"], 2),
               peak_rss_mb=round(res["peak_rss_mb"], 1) if res["peak_rss_mb"] else None, status="ok")
    if res["error"] or not (out / "model.onnx").exists():
        crash = cwd / "qcompile-crash.log"
        row.update(status="error", error=res["error"] or "no model.onnx written")
        if res["rc"] == 1 and crash.exists():
            row["crash_log_tail"] = crash.read_text(errors="replace")[-1500:]
        return row
    row["artifact"] = str(out / "model.onnx")
    row["size_mb"] = round(peers.model_size_mb(out / "model.onnx"), 3)
    rep = json.loads((out / "report.json").read_text())
    ver = (rep.get("verification") or {}).get("outputs") or {}
    row["verify"] = {k: v for k, v in ver.items()}
    row["verify_logits_sqnr_db"] = (ver.get("logits") or {}).get("sqnr_db")
    row["verify_samples"] = (rep.get("verification") or {}).get("samples")
    row["report_compile_seconds"] = rep.get("compile_seconds")
    row["model_export"] = rep.get("model_export")
    row["kv_cache"] = rep.get("kv_cache")
    q = rep.get("quantize") or {}
    row["layers_quantized"] = q.get("quantized", 0)
    row["layers_float"] = q.get("float", 0)
    row["int8_kernels"] = (rep.get("cpu_kernels") or {}).get("int8_layers")
    row["warnings"] = rep.get("warnings") or []
    return row


# ------------------------------------------------------------------ latency

class _Decoder:
    """One greedy decode with the KV cache fed back: `prefill()` (untimed), then `step()` one
    token at a time, each returning the seconds of its `sess.run`."""

    def __init__(self, sess, prompt: np.ndarray):
        self.sess, self.prompt = sess, prompt
        self.names = [o.name for o in sess.get_outputs()]
        self.past = {i.name: (i.shape[1], i.shape[3], np.int8 if i.type == "tensor(int8)" else np.float32)
                     for i in sess.get_inputs() if i.name.startswith("past_key_values.")}

    def prefill(self) -> None:
        length = self.prompt.shape[1]
        self.total = length
        feeds = {"input_ids": self.prompt, "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.arange(length, dtype=np.int64)[None, :]}
        feeds.update({n: np.zeros((1, h, 0, d), dt) for n, (h, d, dt) in self.past.items()})
        self.outs = dict(zip(self.names, self.sess.run(None, feeds)))

    def step(self) -> float:
        token = self.outs["logits"][:, -1, :].argmax(-1).astype(np.int64)[:, None]
        feeds = {"input_ids": token, "attention_mask": np.ones((1, self.total + 1), np.int64),
                 "position_ids": np.full((1, 1), self.total, np.int64)}
        feeds.update({n: self.outs[n.replace("past_key_values.", "present.", 1)] for n in self.past})
        t0 = time.perf_counter()
        res = self.sess.run(None, feeds)
        dt = time.perf_counter() - t0
        self.outs, self.total = dict(zip(self.names, res)), self.total + 1
        return dt


def _loops(sessions: dict, prompt: np.ndarray, steps: int, loops: int, times: dict | None) -> None:
    """`loops` rounds; in each, every session decodes the same prompt in full, the order
    alternating round by round (A B, B A, ...). Whole loops rather than interleaved steps: an
    idle session's intra-op threads spin for a while after its run (onnxruntime's default),
    which would slow a session stepping right after it on a 2-core box."""
    keys = list(sessions)
    for i in range(loops):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            d = _Decoder(sessions[k], prompt)
            d.prefill()
            ts = [d.step() for _ in range(steps)]
            if times is not None:
                times[k] += ts


def _session(path: str, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _latency_child(spec_json: str) -> int:
    """One process: `rounds` times, fresh float and compiled sessions (creation order
    alternating) run alternating decode loops; per model the best round's median step time.
    Prints JSON. Why rounds: on this VM one session of a model is sometimes ~10 % slower than
    another session of the same model in the same process (the float-vs-itself control showed
    ratios 0.89-1.16 with one session each), so each model gets several sessions."""
    spec = json.loads(spec_json)
    spine = _load("qc_bench_spine", ROOT / "tools" / "bench_spine.py")
    rounds = {"float": [], "compiled": []}
    with spine.CpuWatch() as watch:
        for rnd in range(spec["rounds"]):
            keys = ["float", "compiled"] if rnd % 2 == 0 else ["compiled", "float"]
            sessions = {k: _session(spec[k], spec["threads"]) for k in keys}
            vocab = sessions["float"].get_outputs()[0].shape[-1]
            vocab = vocab if isinstance(vocab, int) else 512
            prompt = np.random.default_rng(spec["seed"]).integers(1, vocab, size=(1, spec["prompt_len"]),
                                                                   dtype=np.int64)
            _loops(sessions, prompt, spec["steps"], spec["warmup_loops"], None)
            times = {k: [] for k in sessions}
            _loops(sessions, prompt, spec["steps"], spec["loops"], times)
            for k, v in times.items():
                rounds[k].append(float(np.median(v)) * 1e3)
            del sessions
    res = {k: dict(median_ms=min(v), rounds_ms=v, steps_per_round=spec["steps"] * spec["loops"])
           for k, v in rounds.items()}
    res["ratio"] = res["compiled"]["median_ms"] / res["float"]["median_ms"]
    res["other_cpu"] = watch.other_frac
    print(json.dumps(res))
    return 0


def measure_latency(python: str, float_model: str, compiled: str, args) -> dict:
    spec = dict(float=float_model, compiled=compiled, threads=args.threads, prompt_len=args.latency_prompt,
                steps=args.latency_steps, loops=args.latency_loops, warmup_loops=args.latency_warmup_loops,
                rounds=args.latency_rounds, seed=SEED)
    passes = []
    for _ in range(args.latency_passes):
        r = subprocess.run([python, __file__, "--_latency", json.dumps(spec)], capture_output=True, text=True,
                           cwd=str(ROOT))
        if r.returncode != 0:
            return dict(error=" | ".join(r.stderr.strip().splitlines()[-4:])[-600:], passes=passes)
        passes.append(json.loads(r.stdout.strip().splitlines()[-1]))
    ratios = [p["ratio"] for p in passes]
    return dict(float_ms=min(p["float"]["median_ms"] for p in passes),
                compiled_ms=min(p["compiled"]["median_ms"] for p in passes),
                ratio=float(np.median(ratios)), ratios=ratios,
                other_cpu_max=max((p["other_cpu"] or 0.0) for p in passes), passes=passes, spec=spec)


# ------------------------------------------------------------------ fidelity

def decode_fidelity(float_model: str, compiled: str, steps: int, prompts: int) -> dict:
    dc = _load("qc_decode_compare", ROOT / "tools" / "decode_compare.py")
    res = dc.compare_decode(float_model, compiled, steps=steps, prompts=prompts)
    st = res["steps"]
    res["worst_step_cosine_mean"] = min(s["cosine_mean"] for s in st)
    res["worst_step"] = min(st, key=lambda s: s["cosine_mean"])["step"]
    res["cosine_min"] = min(s["cosine_min"] for s in st)
    res["top1_agreement_mean"] = round(float(np.mean([s["top1_agreement"] for s in st])), 4)
    return res


# ------------------------------------------------------------------ report

def _f(v, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def _weights_cell(setup: dict, row: dict | None = None) -> str:
    w = ((row or {}).get("model_export") or {}).get("qcompile.export.weights") or setup.get("weights")
    return "**RANDOM**" if w == "random" else "seeded (synthetic)"


def render_markdown(setups: list[dict], rows: list[dict], meta: dict) -> str:
    L = ["# Decoder benchmark: int8 KV cache, multi-step decode vs float", "",
         f"`{meta['command']}`", "",
         f"{meta['date']} · {meta['cpu']} ({meta['nproc']} cores) · {meta['platform']} · python {meta['python']} · "
         f"onnxruntime {meta['onnxruntime']} · onnx {meta['onnx']} · qcompile {meta['qcompile']} · git {meta['git']}"
         f" · run {meta.get('wall_s', 0):.0f} s", "",
         "**The `llama_hf*` models have RANDOM weights** (transformers' initialisation of a small "
         "`LlamaForCausalLM`, no trained checkpoint can be had here; ONNX metadata "
         "`qcompile.export.weights=random`, repeated in each compile's `report.json → model_export`): their "
         "logits are nearly flat, so they test the export → compile → decode path and the cache numerics, "
         "not what int8 does to a trained model's predictions. `llama_block` is the seeded builder "
         "(synthetic weights with activation-outlier channels). All three share one geometry: 2 layers, "
         "4 query heads, 2 KV heads × 16, hidden 64, vocab 512.", "",
         "**No onnxruntime peer**: `onnxruntime.quantization` has no KV-cache quantization (it quantizes "
         "weights/activations of operators, never graph inputs/outputs that a runtime feeds back), so every "
         "row is compared with the float model only.", ""]
    plen = next((r["decode"]["prompt_len"] for r in rows if r.get("decode")), "?")
    L += ["## Models", "", "| model | weights | source | nodes | opset | cache inputs | past shape | size MB |",
          "|---|---|---|---:|---:|---:|---|---:|"]
    for s in setups:
        if s["status"] != "ok":
            L.append(f"| {s['name']} | – | {s['source']} | error: {s['error']} | | | | |")
            continue
        L.append(f"| {s['name']} | {_weights_cell(s)} | {s['source']} | {s['nodes']} | {s['opset']} | "
                 f"{s['cache_tensors']} | [{', '.join(map(str, s['cache_dims']))}] | {s['size_mb']:.2f} |")
    L += ["", "## Summary", "",
          f"Decode: {meta['prompts']} random prompts of "
          f"{plen} tokens, {meta['steps']} steps (step 0 = the prefill's "
          "last position, then one-token steps with the cache fed back), the compiled model forced along the float "
          "model's greedy tokens (`tools/decode_compare.py`). *worst-step cos* = the lowest per-step mean cosine "
          "of the next-token logits; *min cos* = the lowest over all steps and prompts; *top-1* = argmax "
          "agreement averaged over steps. *verify SQNR* = qcompile's own check of the prefill logits on "
          f"{EVAL_SAMPLES} held-out prefills (`report.json → verification`); calibration: {CALIB_SAMPLES} "
          f"prefills of {meta['calib_seq']} tokens (positions 0–{meta['calib_seq'] - 1}), about half "
          "right-padded. *compile s* = wall time of the "
          "`python -m qcompile` subprocess (interpreter start-up and verification included). *step ms* = median "
          f"ms per one-token decode step, batch 1, prompt {meta['latency_prompt']} tokens, {meta['latency_steps']} "
          f"steps per loop, {meta['latency_loops']} loops per model after {meta['latency_warmup_loops']} warm-up "
          f"loops, float and compiled alternating loop by loop (A B, B A, …) in one process ({meta['threads']} "
          f"threads, ORT_ENABLE_ALL), {meta['latency_rounds']} fresh session pairs per process (best pair per "
          f"model), best of {meta['latency_passes']} processes; *×float* = compiled ÷ float within each process, median "
          "over processes (> 1: the compiled step is slower); the *latency control* rows time the float model "
          "against itself the same way, so their distance from 1.00 is the noise of the ratio.", "",
          "| model | weights | recipe | cache B/token float → int8 | cache ratio | worst-step cos mean | min cos | "
          "top-1 | verify logits SQNR dB | compile s | step ms float / compiled | step ×float |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    by_setup = {s["name"]: s for s in setups}
    for s in setups:
        lat = s.get("latency_control") or {}
        if lat.get("float_ms") is not None:
            L.append(f"| {s['name']} | {_weights_cell(s)} | float vs itself (latency control) | | | | | | | | "
                     f"{_f(lat.get('float_ms'), '.3f')} / {_f(lat.get('compiled_ms'), '.3f')} | "
                     f"{_f(lat.get('ratio'), '.2f')} |")
    for r in rows:
        s = by_setup[r["model"]]
        if r["status"] != "ok":
            L.append(f"| {r['model']} | {_weights_cell(s)} | `{r['recipe']}` | error (below) | | | | | | "
                     f"{_f(r.get('compile_s'), '.1f')} | | |")
            continue
        fid, lat = r.get("decode") or {}, r.get("latency") or {}
        cb = fid.get("cache_bytes_per_token") or {}
        ratio = cb["compiled"] / cb["float"] if cb.get("float") else None
        L.append(f"| {r['model']} | {_weights_cell(s, r)} | `{r['recipe']}` | {cb.get('float', '–')} → "
                 f"{cb.get('compiled', '–')} | {_f(ratio, '.2f')} | {_f(fid.get('worst_step_cosine_mean'), '.6f')} "
                 f"(step {fid.get('worst_step', '–')}) | {_f(fid.get('cosine_min'), '.6f')} | "
                 f"{_f(fid.get('top1_agreement_mean'), '.3f')} | {_f(r.get('verify_logits_sqnr_db'), '.1f')} | "
                 f"{_f(r.get('compile_s'), '.1f')} | {_f(lat.get('float_ms'), '.3f')} / "
                 f"{_f(lat.get('compiled_ms'), '.3f')} | {_f(lat.get('ratio'), '.2f')} |")
    errs = [r for r in rows if r["status"] != "ok"] + [s for s in setups if s["status"] != "ok"]
    if errs:
        L += ["", "Errors:", ""]
        for r in errs:
            what = f"{r['model']} `{r['recipe']}`" if "recipe" in r else f"setup {r['name']}"
            L.append(f"* {what}: {r['error']}" + (f" — `{r['command']}`" if r.get("command") else ""))
    contended = [r for r in rows if (r.get("latency") or {}).get("other_cpu_max", 0) > 0.10]
    if contended:
        L += ["", "Other processes took more than 10 % of the CPU during the latency of: " +
              ", ".join(f"{r['model']} `{r['recipe']}` ({r['latency']['other_cpu_max']:.0%})" for r in contended) +
              " (the ratio is taken within one process, so it moves less than the ms)."]
    steps = meta["steps"]
    L += ["", "## Per step: mean cosine of the next-token logits vs float", "",
          f"Step 0 is the prefill ({plen}-token prompt); step k ≥ 1 the k-th one-token step "
          f"(cache length {plen} + k − 1 before it), so the new token sits at position {plen} + k − 1 "
          f"(step {steps - 1}: position {plen + steps - 2 if isinstance(plen, int) else '?'}); the "
          f"calibration prefills covered positions 0–{meta['calib_seq'] - 1} only. Mean over the prompts; the "
          "min and the top-1 agreement per step are in `bench.json`.", "",
          "| model | recipe | " + " | ".join(str(i) for i in range(steps)) + " |",
          "|---|---|" + "---:|" * steps]
    for r in rows:
        st = (r.get("decode") or {}).get("steps")
        if not st:
            continue
        L.append(f"| {r['model']} | `{r['recipe']}` | " + " | ".join(f"{s['cosine_mean']:.5f}" for s in st) + " |")
    L += ["", "## Per step: top-1 agreement with float", "",
          "| model | recipe | " + " | ".join(str(i) for i in range(steps)) + " |",
          "|---|---|" + "---:|" * steps]
    for r in rows:
        st = (r.get("decode") or {}).get("steps")
        if st:
            L.append(f"| {r['model']} | `{r['recipe']}` | " + " | ".join(f"{s['top1_agreement']:.2f}" for s in st)
                     + " |")
    L += ["", "## Compiles", "",
          "| model | recipe | layers int8 / float | int8 kernels | KV granularity | size MB | peak RSS MB | "
          "verify cos mean (logits) | present.* SQNR dB (min) |",
          "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            continue
        pres = [v["sqnr_db"] for k, v in (r.get("verify") or {}).items() if k.startswith("present")]
        L.append(f"| {r['model']} | `{r['recipe']}` | {r['layers_quantized']} / {r['layers_float']} | "
                 f"{_f(r.get('int8_kernels'), 'd')} | {(r.get('kv_cache') or {}).get('granularity', '–')} | "
                 f"{_f(r.get('size_mb'), '.3f')} | {_f(r.get('peak_rss_mb'), '.0f')} | "
                 f"{_f(((r.get('verify') or {}).get('logits') or {}).get('cosine_mean'), '.6f')} | "
                 f"{_f(min(pres) if pres else None, '.1f')} |")
    L += ["", "## Recipes", "",
          "`w8a8-kv8` is built in (`compiler/recipes/w8a8-kv8.yaml`: canonicalize, smooth_quant, calibrate "
          "minmax, quantize W8A8, kv_cache per_head). The KV-cache-only recipes, written by the bench:", ""]
    for name, gran in KV_ONLY.items():
        if name in meta["recipes"]:
            L += ["```yaml", kv_only_recipe(name, gran).rstrip(), "```", ""]
    L += ["The compile command (decoders keep their dynamic shapes: no `--input-shape`):", "",
          "    python -m qcompile MODEL --target cpu --recipe R --calib calib.npz --verify-data eval.npz -o OUT -q",
          ""]
    return "\n".join(L)


def _meta(args, argv: list[str]) -> dict:
    return dict(**peers.run_environment(__file__, argv),
                models=args.model_list, recipes=args.recipe_list, steps=args.steps, prompts=args.prompts,
                threads=args.threads, latency_prompt=args.latency_prompt, latency_steps=args.latency_steps,
                latency_loops=args.latency_loops, latency_warmup_loops=args.latency_warmup_loops,
                latency_passes=args.latency_passes, latency_rounds=args.latency_rounds,
                calib_samples=CALIB_SAMPLES, eval_samples=EVAL_SAMPLES,
                calib_seq=args.calib_seq,
                seed=SEED, loadavg_start=os.getloadavg())


# ------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_latency"]:
        return _latency_child(argv[1])
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
            s = setup_model(name, work, args.python, args.calib_seq)
            setups.append(s)
            if s["status"] != "ok":
                _log(f"  {s['error']}")
                rc = max(rc, 3)
                continue
            _log(f"{name}: latency control (float against itself)")
            s["latency_control"] = measure_latency(args.python, s["model"], s["model"], args)
            for recipe in args.recipe_list:
                _log(f"{name}: compiling {recipe}")
                row = run_compile(s, recipe, work, args.python, args.timeout)
                rows.append(row)
                if row["status"] != "ok":
                    _log(f"  error: {row['error']}")
                    rc = max(rc, 1)
                    continue
                _log(f"  {row['compile_s']:.1f} s; decode vs float ({args.steps} steps, {args.prompts} prompts)")
                try:
                    row["decode"] = decode_fidelity(s["model"], row["artifact"], args.steps, args.prompts)
                except Exception as exc:  # a compiled model that cannot decode is a qcompile failure
                    row.update(status="error", error=f"decode_compare: {type(exc).__name__}: {exc}")
                    rc = max(rc, 1)
                    continue
                _log(f"  worst-step cosine {row['decode']['worst_step_cosine_mean']:.6f}; step latency")
                row["latency"] = measure_latency(args.python, s["model"], row["artifact"], args)
                if row["latency"].get("error"):
                    _log(f"  latency error: {row['latency']['error']}")
                else:
                    _log(f"  step {row['latency']['float_ms']:.3f} / {row['latency']['compiled_ms']:.3f} ms, "
                         f"x{row['latency']['ratio']:.2f}")
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(peers.jsonable(dict(meta=meta, models=setups, rows=rows)), indent=1)
                                        + "\n")
        (out / "bench.md").write_text(render_markdown(setups, rows, meta))
        _log(f"wrote {out / 'bench.md'} and bench.json ({meta['wall_s']:.0f} s)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
