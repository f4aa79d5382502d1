"""Multi-step decoding of a compiled decoder against its float original, step by step.

Both models decode the same prompts with their KV caches fed back (models/llama_block.py's
`decode`); the compiled one is forced along the float model's greedy tokens, so each step's
logits compare like with like even where a greedy choice would differ. Reports, per step,
the mean and min cosine of the next-token logits and whether the argmax token agrees, plus
the cache bytes per token of each model (an int8 cache is a quarter of float32's).

    python tools/decode_compare.py FLOAT.onnx COMPILED.onnx [--steps 16] [--prompts 8] [--json out.json]
        [--prompts-from WINDOWS.npz --prompt-len 32]

Prompts are random token ids by default (builders, random-weight models); for a trained LM
give real text: `--prompts-from` takes the first `--prompt-len` tokens of the first `--prompts`
windows of an .npz with `input_ids` (tools/llm_data.py writes them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from llama_block import decode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.evaluate import session  # noqa: E402

_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(int8)": 1, "tensor(uint8)": 1}


def cache_bytes_per_token(session: ort.InferenceSession) -> int:
    """Bytes one token adds to the cache: sum over present.* of the non-batch, non-sequence dims."""
    total = 0
    for out in session.get_outputs():
        if out.name.startswith("present"):
            dims = [d for i, d in enumerate(out.shape) if i not in (0, 2)]
            total += int(np.prod(dims)) * _BYTES.get(out.type, 4)
    return total


def compare_decode(float_model, compiled_model, *, steps: int = 16, prompts: int = 8, prompt_len: int = 12,
                   vocab: int | None = None, seed: int = 0, prompt_ids: np.ndarray | None = None) -> dict:
    """`prompt_ids` [prompts, prompt_len] (real text) instead of random ids when given."""
    ref, got = session(float_model), session(compiled_model)   # a compile's generated kernels registered
    if prompt_ids is not None:
        ids = np.asarray(prompt_ids, dtype=np.int64)
        prompts, prompt_len = ids.shape
    else:
        vocab = vocab or ref.get_outputs()[0].shape[-1]
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, vocab, size=(prompts, prompt_len), dtype=np.int64)
    ref_logits = decode(ref, ids, steps)                       # [P, steps, V]
    forced = ref_logits.argmax(-1)[:, :steps - 1]
    got_logits = decode(got, ids, steps, forced_ids=forced)
    a, b = ref_logits.astype(np.float64), got_logits.astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    agree = ref_logits.argmax(-1) == got_logits.argmax(-1)
    per_step = [{"step": s, "cosine_mean": round(float(cos[:, s].mean()), 6), "cosine_min": round(float(cos[:, s].min()), 6),
                 "top1_agreement": round(float(agree[:, s].mean()), 4)} for s in range(steps)]
    return {"steps": per_step, "prompts": prompts, "prompt_len": prompt_len,
            "cache_bytes_per_token": {"float": cache_bytes_per_token(ref), "compiled": cache_bytes_per_token(got)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("float_model")
    ap.add_argument("compiled_model")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--prompts-from", metavar="NPZ", help="prompts from these text windows (input_ids)")
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args(argv)
    prompt_ids = None
    if args.prompts_from:
        with np.load(args.prompts_from) as z:
            prompt_ids = z["input_ids"][:args.prompts, :args.prompt_len]
    result = compare_decode(args.float_model, args.compiled_model, steps=args.steps, prompts=args.prompts,
                            prompt_ids=prompt_ids)
    for s in result["steps"]:
        print(f"step {s['step']:3d}  cosine mean {s['cosine_mean']:.6f}  min {s['cosine_min']:.6f}  "
              f"top-1 agreement {s['top1_agreement']:.2f}")
    cb = result["cache_bytes_per_token"]
    print(f"cache bytes per token: float {cb['float']}, compiled {cb['compiled']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
