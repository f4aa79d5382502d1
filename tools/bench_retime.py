"""Re-time batch-1 latency of an earlier `tools/bench.py` run's artifacts, with more passes.

Why: the bench takes each model's best *quiet* pass, but "quiet" only sees this VM's processes;
slowdowns from outside it (seen 2026-12-07: the same PP-OCR det artifact at 37 and 83 ms in
back-to-back fresh processes, fp32 at 51 and 93 ms) pass unnoticed and can land on one row in
every pass. This re-runs the same fresh-process latency passes (benchlib.latency) over the
fp32 model, the static MinMax/Entropy peers and the qcompile recipes of each model in WORK,
interleaved, and keeps each one's best of PASSES.

    python tools/bench_retime.py --work WORK --models ppocr_det,ppocr_rec [--recipes w8a8,w8a8-cnn]
        [--passes 8] [--out retime.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
from benchlib import latency  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="the earlier bench's --work folder")
    ap.add_argument("--models", required=True)
    ap.add_argument("--recipes", default="w8a8,w8a8-cnn")
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the milliseconds here as JSON")
    args = ap.parse_args(argv)
    from models import zoo
    work, out = Path(args.work), {}
    for name in [m for m in args.models.split(",") if m]:
        entry = zoo.get(name)
        models = {"fp32": zoo.fetch(name)}
        for peer in ("static-minmax", "static-entropy"):
            if (work / name / "peers" / f"{peer}.onnx").is_file():
                models[f"ort {peer}"] = work / name / "peers" / f"{peer}.onnx"
        for recipe in [r for r in args.recipes.split(",") if r]:
            models[f"qcompile {recipe}"] = work / name / f"qcompile-{recipe}" / "model.onnx"
        missing = [str(p) for p in models.values() if not Path(p).is_file()]
        if missing:
            print(f"error: {name}: not in {work}: {', '.join(missing)}", file=sys.stderr)
            return 2
        shapes = {k: list(v) for k, v in entry.input_shape.items()}
        res = latency.latency_many({k: str(v) for k, v in models.items()}, shapes, batch=1, runs=args.runs,
                                   threads=args.threads, passes=args.passes, max_passes=args.passes,
                                   python=sys.executable)
        ms = {k: (v["ms"] if isinstance(v, dict) else v) for k, v in res.items()}
        fp32 = ms.get("fp32")
        out[name] = {k: {"ms": v, "x_fp32": (fp32 / v) if isinstance(v, float) and isinstance(fp32, float) else None}
                     for k, v in ms.items()}
        print(name, "  ".join(f"{k} {v['ms']:.2f} ms ({v['x_fp32']:.2f}x)" if v["x_fp32"] else f"{k} {v['ms']}"
                              for k, v in out[name].items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
