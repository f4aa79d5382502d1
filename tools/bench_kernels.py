"""Generated kernels against what a user would otherwise run, in one run.

Why: a generated kernel exists to close a measured gap (issue: kernel generation, part 1).
For each model this compiles `w8a8-dynamic` twice — with the generated per-token W8A8 MatMul
(`com.qcompile.QMatMulPerToken`) and in the standard-op form it replaces
(`--set generate_kernels.enabled=false`) — next to onnxruntime's `quantize_dynamic` (per-channel S8
weights) and fp32, and reports:

* accuracy on held-out data (SQNR and cosine of the output against fp32, the same samples for
  every row);
* latency at batch 1 and 16, 2 threads, each (model, pass) in a fresh process, best quiet pass
  (tools/benchlib/latency.py), as ratios to fp32 and to quantize_dynamic taken in this run;
* the kernel build: first build (empty cache), cached build, library size, kernels and layers.

    python tools/bench_kernels.py --out docs/benchmarks/kernels --work build/bench-kernels

Models: MiniLM (all-MiniLM-L6-v2 from its PyPI wheel, sentences from tools/minilm_data.py,
seq 64; calibration and evaluation sentences disjoint) and the seeded BERT block builder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib.evaluate import compare, run_model  # noqa: E402
from benchlib.latency import latency_many  # noqa: E402
from benchlib.measure import run_environment  # noqa: E402
from benchlib.setups import setup_model  # noqa: E402

B16 = 16


def compile_variant(setup, out: Path, *, batch: int, kernels: bool, verify: bool) -> dict:
    from qcompile.driver import compile_model
    shapes = {k: [batch, *v[1:]] for k, v in setup.shapes.items()}
    started = time.perf_counter()
    result = compile_model(setup.model, target="cpu", recipe="w8a8-dynamic", calib=setup.calib,
                           verify_data=setup.eval if verify else None, verify=verify, output_dir=out,
                           input_shapes=shapes, progress=False,
                           settings=() if kernels else ("generate_kernels.enabled=false",))
    return {"path": str(out / "model.onnx"), "seconds": round(time.perf_counter() - started, 2),
            "generated_kernels": result.report.get("generated_kernels")}


def quantize_dynamic_peer(model: Path, out: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return {"path": str(out), "seconds": round(time.perf_counter() - started, 2)}


def accuracy(paths: dict, reference: Path, data: Path, samples: int) -> dict:
    """SQNR (dB) and mean cosine of the first output against fp32 (benchlib.evaluate.compare)."""
    want = run_model(reference, data, limit=samples)
    first = next(iter(want))
    out = {}
    for key, path in paths.items():
        stats = compare(run_model(path, data, limit=samples), want)[first]
        out[key] = {"sqnr_db": round(stats["sqnr_db"], 2), "cosine_mean": round(stats["cosine"], 5)}
    return out


def build_cost(manifest_path: Path) -> dict:
    """The kernels of one compile rebuilt into an empty cache, then again (cached)."""
    from qcompile.backends.cpu.generated_kernels import TEMPLATES
    from qcompile.kernelgen import KernelSpec
    from qcompile.kernelgen.build import build
    from qcompile.kernelgen.ort_headers import find_headers
    from qcompile.kernelgen.render import render_sources
    doc = json.loads(manifest_path.read_text())
    specs = [KernelSpec.from_dict(k["spec"]) for k in doc["kernels"]]
    assert [s.id for s in specs] == [k["id"] for k in doc["kernels"]], "manifest specs do not round-trip"
    headers = find_headers()
    sources = render_sources(TEMPLATES, specs, "bench")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"QCOMPILE_CACHE": tmp}):
        first = build(sources, headers)
        t = time.perf_counter()
        again = build(sources, headers)
        cached_s = time.perf_counter() - t
        size = first.path.stat().st_size
    assert again.cached
    return {"kernels": len(specs), "layers": sum(len(k["layers"]) for k in doc["kernels"]),
            "first_build_s": round(first.seconds, 2), "cached_build_s": round(cached_s, 4),
            "library_kb": round(size / 1024, 1), "compiler": first.compiler}


def bench_model(name: str, args) -> dict:
    work = Path(args.work) / name
    setup = setup_model(name, work / "setup", args)
    row = {"model": name, "notes": setup.notes}
    artifacts = {
        "kernels_b1": compile_variant(setup, work / "kernels_b1", batch=1, kernels=True, verify=True),
        "standard_b1": compile_variant(setup, work / "standard_b1", batch=1, kernels=False, verify=True),
        "kernels_b16": compile_variant(setup, work / "kernels_b16", batch=B16, kernels=True, verify=False),
        "standard_b16": compile_variant(setup, work / "standard_b16", batch=B16, kernels=False, verify=False),
        "quantize_dynamic": quantize_dynamic_peer(setup.model, work / "quantize_dynamic" / "model.onnx"),
    }
    row["compile"] = artifacts
    row["accuracy"] = accuracy({"w8a8-dynamic (kernels)": artifacts["kernels_b1"]["path"],
                                "w8a8-dynamic (standard ops)": artifacts["standard_b1"]["path"],
                                "quantize_dynamic": artifacts["quantize_dynamic"]["path"]},
                               setup.model, setup.eval, args.eval_samples)
    row["build"] = build_cost(work / "kernels_b1" / "kernels" / "manifest.json")
    latency = {}
    for batch, suffix in ((1, "b1"), (B16, "b16")):
        models = {"fp32": setup.model, "quantize_dynamic": artifacts["quantize_dynamic"]["path"],
                  "w8a8-dynamic (standard ops)": artifacts[f"standard_{suffix}"]["path"],
                  "w8a8-dynamic (kernels)": artifacts[f"kernels_{suffix}"]["path"]}
        latency[suffix] = latency_many(models, setup.shapes, batch=batch, runs=args.runs, threads=2,
                                       passes=args.passes, python=args.python)
    row["latency"] = latency
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Generated kernels: w8a8-dynamic with and without them, against quantize_dynamic", "",
             f"* host: {meta['cpu']} · {meta['nproc']} cores · {meta['platform']}; 2 threads; "
             f"onnxruntime {meta['onnxruntime']}; generated by `{meta['command']}`",
             "* latency: median of timed runs, best quiet pass, each (model, pass) in a fresh process; "
             "ratios are speed-ups over the named row, taken in this run",
             "* accuracy: first output against fp32 on held-out samples (the same for every row)", ""]
    for row in rows:
        lines += [f"## {row['model']}", "", *[f"* {n}" for n in row["notes"]], "",
                  "| variant | SQNR dB | cosine | b1 ms | b1 × fp32 | b1 × quantize_dynamic | b16 ms | b16 × fp32 "
                  "| b16 × quantize_dynamic |", "|---|---|---|---|---|---|---|---|---|"]
        for key in ("fp32", "quantize_dynamic", "w8a8-dynamic (standard ops)", "w8a8-dynamic (kernels)"):
            acc = row["accuracy"].get(key, {})
            cells = [key, str(acc.get("sqnr_db", "—")), str(acc.get("cosine_mean", "—"))]
            for b in ("b1", "b16"):
                lat = row["latency"][b]
                mine, fp, qd = lat.get(key), lat.get("fp32"), lat.get("quantize_dynamic")
                if not isinstance(mine, dict):
                    cells += [str(mine)[:160], "", ""]
                    continue
                cells += [f"{mine['ms']:.2f}" + ("" if mine["quiet"] else " (noisy)"),
                          f"{fp['ms'] / mine['ms']:.2f}" if isinstance(fp, dict) else "",
                          f"{qd['ms'] / mine['ms']:.2f}" if isinstance(qd, dict) else ""]
            lines.append("| " + " | ".join(cells) + " |")
        b = row["build"]
        lines += ["", f"Kernel build: {b['kernels']} kernels for {b['layers']} layers; first build "
                      f"{b['first_build_s']} s, cached {b['cached_build_s'] * 1000:.1f} ms; library "
                      f"{b['library_kb']} KB ({b['compiler']}). Compile (b1, with verification): kernels "
                      f"{row['compile']['kernels_b1']['seconds']} s, standard ops "
                      f"{row['compile']['standard_b1']['seconds']} s; quantize_dynamic "
                      f"{row['compile']['quantize_dynamic']['seconds']} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,bert_block")
    p.add_argument("--out", default="docs/benchmarks/kernels")
    p.add_argument("--work", default="build/bench-kernels")
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "qcompile" / "data"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--render", metavar="BENCH_JSON", help="only re-render bench.md from a bench.json")
    args = p.parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        Path(args.render).with_name("bench.md").write_text(render(doc["rows"], doc["meta"]))
        return 0
    meta = run_environment(__file__, sys.argv[1:] if argv is None else list(argv))
    rows = [bench_model(m, args) for m in args.models.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    (out / "bench.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
