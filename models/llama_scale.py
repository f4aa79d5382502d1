"""Llama-architecture decoders at deployment scale, for the layer-wise compile and its
benchmarks: models/llama_block.py's graph (RMSNorm, rotary, KV cache, SiLU MLP) at 7B
shape, seeded weights stored float16 in an external data file that is written tensor by
tensor (the build needs the memory of one weight, ~180 MB at 7B, not of the model).

The weights are random, so the model predicts nothing; what it does have is a trained
LLM's activation statistics where quantization cares: a few hidden channels whose RMSNorm
weight is 20-100x the others (`outlier_gain`), so the inputs of every q/k/v and gate/up
projection carry outlier channels, as trained LLMs' do and as SmoothQuant is for.

    python models/llama_scale.py OUT_DIR [--preset 7b|1b|ci] [--calib N --eval N --seq S]

writes OUT_DIR/model.onnx + model.onnx.data, calib.npz and eval.npz (prefills of `seq`
random tokens, seeds seed+1 / seed+2; the same input format as llama_block's).

Presets (parameters, float16 weight bytes):
    7b: hidden 4096, 32 layers, intermediate 11008, 32 heads (no GQA), vocab 32000 — LLaMA-2 7B's
        shape: 6.74 B parameters, 13.5 GB
    1b: hidden 2048, 16 layers, intermediate 5504, 16 heads, vocab 32000: 0.94 B, 1.9 GB
        (3.8 GB in float32: past protobuf's 2 GB limit once widened)
    ci: hidden 1024, 8 layers, intermediate 2816, 8 heads, vocab 8000: 0.12 B, 236 MB
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or loaded by path
import llama_block  # noqa: E402
from graph_builder import ExternalDataBuilder  # noqa: E402

MODEL_FILE = "model.onnx"


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_pos: int = 4096
    outlier_channels: int = 6
    outlier_gain: tuple = (20.0, 100.0)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


PRESETS = {
    "7b": Shape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "1b": Shape(hidden=2048, layers=16, intermediate=5504, heads=16, kv_heads=16, vocab=32000),
    "ci": Shape(hidden=1024, layers=8, intermediate=2816, heads=8, kv_heads=8, vocab=8000, max_pos=1024),
}


def build(out_dir: str | Path, shape: Shape, *, seed: int = 0, dtype=np.float16) -> Path:
    """Write OUT_DIR/model.onnx with its weights in model.onnx.data; returns the model path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    builder = ExternalDataBuilder(out / (MODEL_FILE + ".data"))
    try:
        model = llama_block.build(seed, vocab=shape.vocab, hidden=shape.hidden, heads=shape.heads,
                                  kv_heads=shape.kv_heads, head_dim=shape.head_dim, layers=shape.layers,
                                  intermediate=shape.intermediate, max_pos=shape.max_pos,
                                  outlier_channels=shape.outlier_channels, outlier_gain=shape.outlier_gain,
                                  dtype=dtype, builder=builder, check=False)
    finally:
        builder.close()
    model.graph.name = "llama_scale"
    onnx.save(model, path)
    onnx.checker.check_model(str(path))   # by path: the checker reads the external data's metadata
    return path


def sample_inputs(shape: Shape, n: int, seed: int, seq: int, dtype=np.float16) -> dict[str, np.ndarray]:
    return llama_block.sample_inputs(n, seed, seq=seq, vocab=shape.vocab, layers=shape.layers,
                                     kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype=dtype)


def write(out_dir: str | Path, preset: str = "ci", *, seed: int = 0, calib: int = 8, evaluation: int = 4,
          seq: int = 128, dtype=np.float16) -> dict[str, Path]:
    """The model and its calib.npz / eval.npz; returns their paths."""
    shape = PRESETS[preset]
    out = Path(out_dir)
    paths = {"model": build(out, shape, seed=seed, dtype=dtype), "calib": out / "calib.npz", "eval": out / "eval.npz"}
    np.savez(paths["calib"], **sample_inputs(shape, calib, seed + 1, seq, dtype))
    np.savez(paths["eval"], **sample_inputs(shape, evaluation, seed + 2, seq, dtype))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=8, help="calibration prefills (default 8)")
    ap.add_argument("--eval", type=int, default=4, help="held-out prefills (default 4)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per prefill (default 128)")
    ap.add_argument("--float32", action="store_true", help="store float32 weights instead of float16")
    args = ap.parse_args(argv)
    shape = PRESETS[args.preset]
    dtype = np.float32 if args.float32 else np.float16
    print(f"{args.preset}: {shape.parameters() / 1e9:.2f} B parameters, "
          f"{shape.parameters() * np.dtype(dtype).itemsize / 1e9:.1f} GB of weights", flush=True)
    started = time.perf_counter()
    paths = write(args.out_dir, args.preset, seed=args.seed, calib=args.calib, evaluation=args.eval,
                  seq=args.seq, dtype=dtype)
    print(f"wrote {paths['model']} (+ .data), calib.npz, eval.npz in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
