"""Scale benchmark: compiling decoders larger than the memory one wants to spend, layer-wise
(`--max-memory`), against the whole-model compile where that fits.

For each model and recipe, a fresh measured subprocess (tools/benchlib/measure.py
`run_measured`: exact wall time and peak RSS) runs `qcompile`; a thread samples the disk the
compile uses meanwhile (scratch activations and weights plus the output). From the compile's
report.json: seconds and peak RSS per pass and per phase (load, write, verify), the blocks,
output sizes, verification (logits SQNR, perplexity change, top-1 agreement — of a model with
random weights these say how far the compiled model drifts, not how good it is).

The floor: every pass that reads activations runs the model forward over the calibration
tokens at least once; `floor_s` is one float32 forward over those tokens (2 × weights'
multiply-adds per token) at this machine's measured float32 GEMM rate (numpy, one
4096×4096×4096 product), and the compile is reported as a multiple of it.

Models: `models/llama_scale.py` presets (`7b`: LLaMA-2 7B's shape, 13.5 GB float16; `1b`:
1.9 GB), built into --work if missing, calibrated on their own calib.npz (random tokens),
verified on eval.npz. `--compare NAME` also compiles a trained model both ways and compares
the output tensors byte for byte (NAME `smollm2`: SmolLM2-135M as tools/bench_llm.py exports it;
its calibration and held-out windows from build/bench-kernels/smollm2/data).

    python tools/bench_scale.py --models 7b --recipes w8a8-smooth,w4a16-gptq --max-memory 8
    python tools/bench_scale.py --models 1b --whole 1b --max-memory 4   # also the whole-model compile
    python tools/bench_scale.py --models '' --sharded smollm2 --append  # --workers 2 and --ray auto vs 1 process
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib.measure import jsonable, model_size_mb, run_environment, run_measured  # noqa: E402
from models import llama_scale  # noqa: E402

OUT = ROOT / "docs" / "benchmarks" / "scale"


def gemm_gflops() -> float:
    """This machine's float32 GEMM rate (numpy), best of three."""
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 ** 3 / best / 1e9


def calib_tokens(calib: Path) -> int:
    with np.load(calib) as z:
        return int(z["attention_mask"].sum()) if "attention_mask" in z.files else int(np.prod(z["input_ids"].shape))


def linear_params(model: Path) -> int:
    """Weights a forward pass multiplies (MatMul/Gemm initializers; the embedding is a lookup)."""
    import onnx
    proto = onnx.load(str(model), load_external_data=False)
    inits = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
    return sum(inits.get(n.input[1], 0) for n in proto.graph.node if n.op_type in ("MatMul", "Gemm"))


class DiskWatch:
    """Peak of the disk space used under a folder's filesystem beyond what was used at start."""

    def __init__(self, folder: Path):
        self.folder, self.peak = folder, 0
        self._base = shutil.disk_usage(folder).used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, shutil.disk_usage(self.folder).used - self._base)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def compile_one(model: Path, calib: Path, evaluation: Path | None, recipe: str, out: Path,
                max_memory: float | None, timeout: float, extra: tuple[str, ...] = ()) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "qcompile", str(model), "--recipe", recipe, "--calib", str(calib), "-o", str(out), "-q"]
    if evaluation is not None:
        cmd += ["--verify-data", str(evaluation)]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    cmd += list(extra)
    print(f"  {recipe} {'--max-memory ' + str(max_memory) if max_memory else 'whole model'} {' '.join(extra)} ...",
          flush=True)
    with DiskWatch(out.parent) as disk:
        r = run_measured(cmd, timeout=timeout, cwd=str(out.parent), mem_limit_mb=22_000)
    row = {"recipe": recipe, "max_memory_gb": max_memory, "extra": list(extra), "rc": r["rc"], "wall_s": round(r["wall_s"], 1),
           "peak_rss_mb": r["peak_rss_mb"], "disk_peak_mb": round(disk.peak / 1e6), "error": r.get("error")}
    if r["rc"] != 0:
        row["stderr"] = (r.get("stderr") or "")[-2000:]
        print(f"    failed: {row.get('error') or row['stderr'][-300:]}", flush=True)
        return row
    report = json.loads((out / "report.json").read_text())
    verification = report.get("verification") or {}
    logits = (verification.get("outputs") or {}).get("logits") or {}
    row.update(passes=[{k: p[k] for k in ("pass", "seconds", "peak_rss_mb") if k in p} for p in report["passes"]],
               phases=report.get("phases"), memory=report.get("memory"), output_mb=round(model_size_mb(out / "model.onnx")),
               logits_sqnr_db=logits.get("sqnr_db"), task=verification.get("task"),
               layer_wise_verification=verification.get("layer_wise", False))
    print(f"    {row['wall_s']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB, disk {row['disk_peak_mb']} MB", flush=True)
    return row


def same_tensors(a: Path, b: Path) -> dict:
    """Whether two compiled models hold the same nodes and byte-identical initializers."""
    import onnx
    pa, pb = onnx.load(str(a)), onnx.load(str(b))
    ta = {t.name: onnx.numpy_helper.to_array(t) for t in pa.graph.initializer}
    tb = {t.name: onnx.numpy_helper.to_array(t) for t in pb.graph.initializer}
    differ = sorted(n for n in ta.keys() & tb.keys() if ta[n].tobytes() != tb[n].tobytes() or ta[n].shape != tb[n].shape)
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in pa.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in pb.graph.node]
    return {"initializers": len(ta), "names_equal": ta.keys() == tb.keys(), "differing": differ[:10],
            "nodes_equal": nodes, "identical": ta.keys() == tb.keys() and not differ and nodes}


STATISTICS_PASSES = ("calibrate", "smooth_quant", "awq", "gptq", "sparsify")


def sharded_runs(model: Path, calib: Path, evaluation: Path, recipe: str, work: Path, name: str, workers: int,
                 max_memory: float | None, timeout: float) -> dict:
    """The same compile in one process, with --workers N and with N tasks on a local Ray: wall
    time, the statistics passes' time, and whether the outputs are the single-process bytes."""
    modes = {"1 process": (), f"--workers {workers}": ("--workers", str(workers)),
             f"--ray auto ({workers} tasks)": ("--ray", "auto", "--workers", str(workers))}
    runs, base = {}, None
    for label, extra in modes.items():
        out = work / f"shard-{name}-{recipe}-{len(runs)}"
        row = compile_one(model, calib, evaluation, recipe, out, max_memory, timeout, extra)
        if row["rc"] == 0:
            row["statistics_s"] = round(sum(p["seconds"] for p in row["passes"] if p["pass"] in STATISTICS_PASSES), 1)
            if base is None:
                base = out
            else:
                row["same"] = same_tensors(out / "model.onnx", base / "model.onnx")
        runs[label] = row
    return {"model": name, "recipe": recipe, "workers": workers, "max_memory_gb": max_memory, "runs": runs}


def comparison_model(name: str) -> tuple[Path, Path, Path]:
    if name != "smollm2":
        raise SystemExit(f"--compare: unknown model {name!r} (smollm2)")
    from models import zoo
    model = zoo.cache_root() / "models" / "smollm2" / "export" / "smollm2.onnx"
    data = ROOT / "build" / "bench-kernels" / "smollm2" / "data"
    if not model.exists() or not (data / "calib.npz").exists():
        raise SystemExit("--compare smollm2: run tools/bench_kernels.py (or tools/bench_llm.py) once first: it "
                         "exports SmolLM2-135M and cuts its calibration / held-out windows")
    return model, data / "calib.npz", data / "eval.npz"


def render(doc: dict) -> str:
    lines = ["# Scale: layer-wise compiles of decoders larger than the memory they may use", "",
             f"{doc['environment']['date']} · {doc['environment']['cpu']} ({doc['environment']['nproc']} cores) · "
             f"git {doc['environment']['git']} · float32 GEMM {doc['gemm_gflops']:.0f} GFLOP/s (numpy)", "",
             f"`{doc['environment']['command']}`", "",
             *[f"then {e['date']} (git {e['git']}): `{e['command']}`" for e in doc.get("more_runs", [])],
             *([""] if doc.get("more_runs") else []),
             "| model | weights | recipe | mode | wall s | × floor | peak RSS MB | disk MB | output MB | blocks | "
             "logits SQNR dB | ppl Δ % | top-1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in doc["models"]:
        for r in m["runs"]:
            task = r.get("task") or {}
            mode = f"--max-memory {r['max_memory_gb']:g}" if r["max_memory_gb"] else "whole model"
            floor = f"{r['wall_s'] / m['floor_s']:.1f}" if r.get("rc") == 0 and m.get("floor_s") else "–"
            lines.append(f"| {m['name']} | {m['weights_gb']:.1f} GB {m['dtype']} | {r['recipe']} | {mode} | "
                         f"{r['wall_s']:.0f} | {floor} | {r.get('peak_rss_mb') or 0:.0f} | {r.get('disk_peak_mb', '–')} | "
                         f"{r.get('output_mb', '–')} | {(r.get('memory') or {}).get('blocks', '–')} | "
                         f"{r.get('logits_sqnr_db', '–')} | {task.get('perplexity_delta_pct', '–')} | "
                         f"{task.get('top1_agreement', '–')} |" if r.get("rc") == 0 else
                         f"| {m['name']} | {m['weights_gb']:.1f} GB | {r['recipe']} | {mode} | failed: "
                         f"{(r.get('error') or r.get('stderr', ''))[-120:]} | | | | | | | | |")
    lines += ["", "Per pass (seconds / peak RSS MB):", ""]
    for m in doc["models"]:
        for r in m["runs"]:
            if r.get("rc") != 0:
                continue
            steps = [f"{p['pass']} {p['seconds']:.0f} s / {p.get('peak_rss_mb') or 0:.0f}" for p in r["passes"]]
            steps += [f"{k} {v['seconds']:.0f} s / {v.get('peak_rss_mb') or 0:.0f}" for k, v in (r.get("phases") or {}).items()]
            mode = f"--max-memory {r['max_memory_gb']:g}" if r["max_memory_gb"] else "whole"
            lines.append(f"* {m['name']} {r['recipe']} ({mode}): " + ", ".join(steps))
    for c in doc.get("comparisons", []):
        lines += ["", f"{c['model']} {c['recipe']}: layer-wise (--max-memory {c['max_memory_gb']:g}, "
                      f"{c['blocks']} blocks) vs whole-model output tensors: "
                      f"{'identical' if c['same']['identical'] else 'DIFFERENT ' + str(c['same'])} "
                      f"({c['same']['initializers']} initializers); verification "
                      f"{'identical' if c['verification_equal'] else 'differs: ' + c['verification_note']}."]
    for s in doc.get("sharded", []):
        mode = f", --max-memory {s['max_memory_gb']:g}" if s.get("max_memory_gb") else ""
        lines += ["", f"{s['model']} {s['recipe']}{mode}: calibration statistics sharded "
                      "(the statistics passes: " + ", ".join(STATISTICS_PASSES) + "; peak RSS: the largest "
                      "process the bench waited for — forked workers count, Ray's worker processes do not)", "",
                  "| mode | wall s | × 1 process | statistics passes s | × 1 process | peak RSS MB | output |",
                  "|---|---|---|---|---|---|---|"]
        one = next(iter(s["runs"].values()))
        for label, r in s["runs"].items():
            if r.get("rc") != 0:
                lines.append(f"| {label} | failed: {(r.get('error') or r.get('stderr', ''))[-160:]} | | | | | |")
                continue
            same = r.get("same")
            output = "the reference" if same is None else \
                ("byte-identical" if same["identical"] else f"differs: {same['differing'][:3]}")
            ratio = lambda k: f"{r[k] / one[k]:.2f}" if one.get("rc") == 0 and one.get(k) else "–"   # noqa: E731
            lines.append(f"| {label} | {r['wall_s']:.0f} | {ratio('wall_s')} | {r['statistics_s']:.0f} | "
                         f"{ratio('statistics_s')} | {r.get('peak_rss_mb') or 0:.0f} | {output} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="7b", help="llama_scale presets, comma-separated (default 7b)")
    ap.add_argument("--recipes", default="w8a8-smooth,w4a16-gptq")
    ap.add_argument("--max-memory", type=float, default=8.0, help="GB (default 8)")
    ap.add_argument("--whole", default="", help="presets also compiled whole, comma-separated (needs the memory)")
    ap.add_argument("--compare", default="", help="trained models to compile both ways and compare (smollm2)")
    ap.add_argument("--compare-memory", type=float, default=1.5, help="--max-memory for --compare (GB)")
    ap.add_argument("--compare-recipes", default="", help="recipes for --compare (default: --recipes)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-scale")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--append", action="store_true", help="add to --out's bench.json instead of replacing it")
    ap.add_argument("--sharded", default="", help="models (smollm2, or presets) compiled in one process, with "
                                                   "--workers N and with --ray auto, compared (comma-separated)")
    ap.add_argument("--sharded-recipes", default="w4a16-gptq")
    ap.add_argument("--sharded-workers", type=int, default=2)
    ap.add_argument("--sharded-memory", type=float, default=None, help="--max-memory for --sharded (GB)")
    args = ap.parse_args(argv)
    args.work, args.out = args.work.resolve(), args.out.resolve()   # the compiles run in their own folder
    args.work.mkdir(parents=True, exist_ok=True)
    environment = run_environment(__file__, argv if argv is not None else sys.argv[1:])
    doc = {"environment": environment, "gemm_gflops": gemm_gflops(), "models": [], "comparisons": []}
    if args.append and (args.out / "bench.json").exists():   # one table for runs made in several sittings
        doc = json.loads((args.out / "bench.json").read_text())
        doc.setdefault("more_runs", []).append(environment)
    for preset in [p for p in args.models.split(",") if p]:
        folder = args.work / preset
        files = {"model": folder / "model.onnx", "calib": folder / "calib.npz", "eval": folder / "eval.npz"}
        if not all(p.exists() for p in files.values()):
            print(f"building {preset} in {folder} ...", flush=True)
            files = llama_scale.write(folder, preset)
        shape = llama_scale.PRESETS[preset]
        tokens = calib_tokens(files["calib"])
        floor = 2 * linear_params(files["model"]) * tokens / (doc["gemm_gflops"] * 1e9)
        entry = {"name": preset, "parameters": shape.parameters(), "weights_gb": model_size_mb(files["model"]) / 1e3,
                 "dtype": "float16", "calib_tokens": tokens, "floor_s": round(floor, 1), "runs": []}
        print(f"{preset}: {entry['weights_gb']:.1f} GB, floor {floor:.0f} s", flush=True)
        doc["models"].append(entry)
        for recipe in args.recipes.split(","):
            modes = [args.max_memory] + ([None] if preset in args.whole.split(",") else [])
            for mode in modes:
                entry["runs"].append(compile_one(files["model"], files["calib"], files["eval"], recipe,
                                                 args.work / f"out-{preset}-{recipe}-{'lw' if mode else 'whole'}",
                                                 mode, args.timeout))
                write(doc, args.out)   # after every run: a long bench keeps what it measured
    for name in [n for n in args.compare.split(",") if n]:
        model, calib, evaluation = comparison_model(name)
        for recipe in (args.compare_recipes or args.recipes).split(","):
            whole = compile_one(model, calib, evaluation, recipe, args.work / f"cmp-{name}-{recipe}-whole", None,
                                args.timeout)
            layered = compile_one(model, calib, evaluation, recipe, args.work / f"cmp-{name}-{recipe}-lw",
                                  args.compare_memory, args.timeout)
            if whole["rc"] != 0 or layered["rc"] != 0:
                continue
            same = same_tensors(args.work / f"cmp-{name}-{recipe}-lw" / "model.onnx",
                                args.work / f"cmp-{name}-{recipe}-whole" / "model.onnx")
            vw = json.loads((args.work / f"cmp-{name}-{recipe}-whole" / "report.json").read_text())["verification"]
            vl = json.loads((args.work / f"cmp-{name}-{recipe}-lw" / "report.json").read_text())["verification"]
            equal = vw["outputs"] == vl["outputs"] and vw.get("task") == vl.get("task")
            doc["comparisons"].append({"model": name, "recipe": recipe, "max_memory_gb": args.compare_memory,
                                       "blocks": (layered.get("memory") or {}).get("blocks"), "same": same,
                                       "verification_equal": equal,
                                       "verification_note": "" if equal else json.dumps({"whole": vw.get("task"),
                                                                                        "layer_wise": vl.get("task")}),
                                       "whole": whole, "layer_wise": layered})
            write(doc, args.out)
    for name in [n for n in args.sharded.split(",") if n]:
        if name in llama_scale.PRESETS:
            folder = args.work / name
            if not (folder / "model.onnx").exists():
                llama_scale.write(folder, name)
            model, calib, evaluation = folder / "model.onnx", folder / "calib.npz", folder / "eval.npz"
        else:
            model, calib, evaluation = comparison_model(name)
        for recipe in args.sharded_recipes.split(","):
            doc.setdefault("sharded", []).append(sharded_runs(model, calib, evaluation, recipe, args.work, name,
                                                              args.sharded_workers, args.sharded_memory, args.timeout))
            write(doc, args.out)
    write(doc, args.out)
    print(f"wrote {args.out / 'bench.md'}")
    return 0


def write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(jsonable(doc), indent=2) + "\n")
    (out / "bench.md").write_text(render(doc))


if __name__ == "__main__":
    sys.exit(main())
