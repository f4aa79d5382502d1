"""Text windows for causal LMs: calibration, tuning and held-out evaluation sets as `.npz`.

Why: an LLM recipe is judged by perplexity on text the compile never saw. The texts ship in
PyPI wheels (models/zoo.py `TEXTS`, hash-pinned) or with Python itself:

* `lady_susan` — Jane Austen's *Lady Susan* (music21's `en.txt`, Gutenberg header and footer
  stripped), tokenized once and cut into non-overlapping windows of `seq` tokens. The first
  `calib` windows are the **calibration** set; the last `eval` windows the **held-out** set;
  the windows between them the **tune** set (what `--max-loss` may judge on: that data is
  tuned on, so it is kept apart from the held-out windows).
* `other` — English of another kind and author: the Python documentation's topic texts
  (`pydoc_data.topics` of the interpreter running this tool; the Python version is in the
  data card), the first `eval` windows. No choice is made on it.
* `french` — music21's `fr.txt`, the first `eval` windows (a language the model barely knows).

Each set is written in the layout `qcompile --calib` reads for the given model: `input_ids`
and `attention_mask` (all ones), plus `position_ids` (0..seq-1) and empty `past_key_values.*`
([n, kv_heads, 0, head_dim]) when the model has a KV cache: a window is a prefill.
`data_card.json` beside them says which text, which windows and how many tokens.

    python tools/llm_data.py MODEL.onnx TOKENIZER.json --out DIR [--seq 256] [--calib 32] [--eval 40]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_HEADER = re.compile(r"^\s*\*\*\*.*(project gutenberg|start of).*$", re.IGNORECASE)
_FOOTER = re.compile(r"^\s*(\*\*\*\s*)?end of (the|this) project gutenberg", re.IGNORECASE)


class TextDataError(Exception):
    """One clear message: what is wrong with the text or the model's inputs."""


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg etext: lines after its `*** ... ***` header line and
    before its `End of the Project Gutenberg ...` footer (either may be absent)."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines[:50]) if _HEADER.match(line)), 0)
    end = next((i for i in range(len(lines) - 1, start - 1, -1) if _FOOTER.match(lines[i])), len(lines))
    return "\n".join(lines[start:end]).strip() + "\n"


def other_english() -> tuple[str, str]:
    """(text, provenance) of the Python documentation's topics, in sorted topic order."""
    import platform

    import pydoc_data.topics as topics
    text = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
    return text, f"pydoc_data.topics of Python {platform.python_version()}"


def tokenize(tokenizer_json: str | Path, text: str) -> np.ndarray:
    """Token ids of `text` without special tokens (the `tokenizers` package; no torch)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def windows(ids: np.ndarray, seq: int) -> np.ndarray:
    """Non-overlapping windows of `seq` tokens, [n, seq] (the tail shorter than one is dropped)."""
    n = len(ids) // seq
    if n == 0:
        raise TextDataError(f"the text has {len(ids)} tokens, shorter than one window of {seq}: "
                            "give more text or a smaller --seq")
    return ids[:n * seq].reshape(n, seq)


def model_feeds(model_path: str | Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Prefill feeds of `ids` [n, seq] for the model's inputs (see the module docstring)."""
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    n, seq = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for inp in graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((n, seq), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy()
        elif inp.name.startswith("past") and len(dims) == 4 and dims[1] and dims[3]:
            feeds[inp.name] = np.zeros((n, dims[1], 0, dims[3]), np.float32)
        else:
            raise TextDataError(f"{model_path}: input {inp.name!r} {dims} is not one a causal LM's text window "
                                "fills (input_ids, attention_mask, position_ids, past_key_values.*)")
    if "input_ids" not in feeds:
        raise TextDataError(f"{model_path} has no input_ids input: not a causal LM")
    return feeds


def make_sets(model: str | Path, tokenizer_json: str | Path, out_dir: str | Path, *, seq: int = 256,
              calib: int = 32, eval: int = 40, prefix: str = "") -> dict[str, Path]:
    """calib / tune / eval (Lady Susan), other (English documentation) and french `.npz` sets."""
    from models import zoo
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    susan_path = zoo.fetch_text("lady_susan")
    susan = windows(tokenize(tokenizer_json, strip_gutenberg(susan_path.read_text(encoding="utf-8"))), seq)
    if len(susan) < calib + eval:
        raise TextDataError(f"Lady Susan gives {len(susan)} windows of {seq} tokens; {calib} calibration + "
                            f"{eval} held-out windows do not fit: ask for fewer or a smaller --seq")
    other_text, other_source = other_english()
    french_path = zoo.fetch_text("french")
    sets = {
        "calib": (susan[:calib], f"Lady Susan windows 0..{calib - 1}"),
        "tune": (susan[calib:len(susan) - eval], f"Lady Susan windows {calib}..{len(susan) - eval - 1}"),
        "eval": (susan[len(susan) - eval:], f"Lady Susan windows {len(susan) - eval}..{len(susan) - 1}"),
        "other": (windows(tokenize(tokenizer_json, other_text), seq)[:eval], f"first {eval} windows of {other_source}"),
        "french": (windows(tokenize(tokenizer_json, strip_gutenberg(french_path.read_text(encoding="utf-8"))),
                           seq)[:eval], f"first {eval} windows of music21 fr.txt"),
    }
    paths, card = {}, {"seq": seq, "model": str(model), "tokenizer": str(tokenizer_json), "sets": {}}
    for name, (ids, what) in sets.items():
        if len(ids) == 0:
            continue
        path = out / f"{prefix}{name}.npz"
        np.savez(path, **model_feeds(model, ids))
        paths[name] = path
        card["sets"][name] = {"file": path.name, "windows": int(len(ids)), "tokens": int(ids.size), "text": what}
    (out / f"{prefix}data_card.json").write_text(json.dumps(card, indent=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the causal LM's ONNX (its inputs decide the layout)")
    ap.add_argument("tokenizer", help="tokenizer.json (models/export_hf.py --tokenizer DIR writes one)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--prefix", default="")
    args = ap.parse_args(argv)
    try:
        paths = make_sets(args.model, args.tokenizer, args.out, seq=args.seq, calib=args.calib, eval=args.eval,
                          prefix=args.prefix)
    except TextDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
