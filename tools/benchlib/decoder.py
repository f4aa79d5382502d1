"""The decoder bench's pieces: the decoders (seeded builder, random-weight Hugging Face Llama in
both exporters) with prefill calibration/eval data, the KV-cache-only recipes, a compile row
from qcompile's report, multi-step decode fidelity (tools/decode_compare.py) and the markdown."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .compiles import run_qcompile
from .measure import model_size_mb
from .render import fmt

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_MODELS = ("llama_block", "llama_hf", "llama_hf_dynamo")
DEFAULT_RECIPES = ("w8a8-kv8", "kv8-per-head", "kv8-per-channel")
KV_ONLY = {"kv8-per-head": "per_head", "kv8-per-channel": "per_channel"}
CALIB_SAMPLES, EVAL_SAMPLES, SEED = 32, 64, 0


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
    from models import llama_block as lb
    np.savez(d / "calib.npz", **lb.sample_inputs(CALIB_SAMPLES, SEED + 1, seq=calib_seq))
    np.savez(d / "eval.npz", **lb.sample_inputs(EVAL_SAMPLES, SEED + 2))


def setup_decoder(name: str, work: Path, python: str, calib_seq: int = 16) -> dict:
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
                cache_tensors=len(past), cache_dims=dims, size_mb=round(model_size_mb(model), 3))


def run_compile(setup: dict, recipe: str, work: Path, python: str, timeout: float) -> dict:
    """One measured compile of a decoder (dynamic shapes kept, verified on eval.npz) as a row."""
    q = run_qcompile(python, setup["model"], setup["calib"], None, work / setup["name"] / f"out-{recipe}",
                     recipe_arg(recipe, work), verify_data=setup["eval"], timeout=timeout)
    row = dict(model=setup["name"], recipe=recipe, command=q["command"], compile_s=round(q["wall_s"], 2),
               peak_rss_mb=round(q["peak_rss_mb"], 1) if q["peak_rss_mb"] else None, status=q["status"])
    if q["status"] != "ok":
        row["error"] = q["error"]
        return row
    rep = q.get("report") or {}
    ver = (rep.get("verification") or {}).get("outputs") or {}
    row.update(artifact=q["out"], size_mb=round(q["size_mb"], 3), verify=dict(ver),
               verify_logits_sqnr_db=(ver.get("logits") or {}).get("sqnr_db"),
               verify_samples=(rep.get("verification") or {}).get("samples"),
               report_compile_seconds=rep.get("compile_seconds"), model_export=rep.get("model_export"),
               kv_cache=rep.get("kv_cache"), layers_quantized=(rep.get("quantize") or {}).get("quantized", 0),
               layers_float=(rep.get("quantize") or {}).get("float", 0),
               int8_kernels=(rep.get("cpu_kernels") or {}).get("int8_layers"), warnings=rep.get("warnings") or [])
    return row


def decode_fidelity(float_model: str, compiled: str, steps: int, prompts: int) -> dict:
    import decode_compare
    res = decode_compare.compare_decode(float_model, compiled, steps=steps, prompts=prompts)
    st = res["steps"]
    res["worst_step_cosine_mean"] = min(s["cosine_mean"] for s in st)
    res["worst_step"] = min(st, key=lambda s: s["cosine_mean"])["step"]
    res["cosine_min"] = min(s["cosine_min"] for s in st)
    res["top1_agreement_mean"] = round(float(np.mean([s["top1_agreement"] for s in st])), 4)
    return res


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
                     f"{fmt(lat.get('float_ms'), '.3f')} / {fmt(lat.get('compiled_ms'), '.3f')} | "
                     f"{fmt(lat.get('ratio'), '.2f')} |")
    for r in rows:
        s = by_setup[r["model"]]
        if r["status"] != "ok":
            L.append(f"| {r['model']} | {_weights_cell(s)} | `{r['recipe']}` | error (below) | | | | | | "
                     f"{fmt(r.get('compile_s'), '.1f')} | | |")
            continue
        fid, lat = r.get("decode") or {}, r.get("latency") or {}
        cb = fid.get("cache_bytes_per_token") or {}
        ratio = cb["compiled"] / cb["float"] if cb.get("float") else None
        L.append(f"| {r['model']} | {_weights_cell(s, r)} | `{r['recipe']}` | {cb.get('float', '–')} → "
                 f"{cb.get('compiled', '–')} | {fmt(ratio, '.2f')} | {fmt(fid.get('worst_step_cosine_mean'), '.6f')} "
                 f"(step {fid.get('worst_step', '–')}) | {fmt(fid.get('cosine_min'), '.6f')} | "
                 f"{fmt(fid.get('top1_agreement_mean'), '.3f')} | {fmt(r.get('verify_logits_sqnr_db'), '.1f')} | "
                 f"{fmt(r.get('compile_s'), '.1f')} | {fmt(lat.get('float_ms'), '.3f')} / "
                 f"{fmt(lat.get('compiled_ms'), '.3f')} | {fmt(lat.get('ratio'), '.2f')} |")
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
                 f"{fmt(r.get('int8_kernels'), 'd')} | {(r.get('kv_cache') or {}).get('granularity', '–')} | "
                 f"{fmt(r.get('size_mb'), '.3f')} | {fmt(r.get('peak_rss_mb'), '.0f')} | "
                 f"{fmt(((r.get('verify') or {}).get('logits') or {}).get('cosine_mean'), '.6f')} | "
                 f"{fmt(min(pres) if pres else None, '.1f')} |")
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
