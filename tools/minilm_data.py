"""Deterministic sentence sets for all-MiniLM-L6-v2 and its task metric.

Varied English sentences are composed from seeded templates (statements, questions,
instructions, numbers, named things), tokenized with the checkpoint's own
`tokenizer.json` (the `tokenizers` package; no torch), padded to a fixed length and
stored as `.npz` in the layout `qcompile --calib` reads. Calibration (64) and
evaluation (200) sets are disjoint.

    python tools/minilm_data.py CHECKPOINT_DIR --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SUBJECTS = ["the engineer", "a small robot", "my neighbour", "the committee", "our team", "the old library",
            "a curious child", "the river", "this compiler", "the weather service", "a hungry fox", "the mayor",
            "the orchestra", "every student", "the startup", "a quiet village", "the spacecraft", "grandma"]
VERBS = ["builds", "repairs", "describes", "ignores", "celebrates", "measures", "questions", "paints",
         "delivers", "translates", "predicts", "remembers", "borrows", "optimizes", "announces", "visits"]
OBJECTS = ["a wooden bridge", "the quarterly report", "three red apples", "an ancient map", "the new budget",
           "a broken violin", "the evening news", "fresh bread", "a long poem", "the train schedule",
           "twelve blue chairs", "the museum collection", "a secret recipe", "the traffic lights",
           "a neural network", "the football match", "a winter coat", "the garden fence"]
PLACES = ["in Paris", "near the harbour", "after midnight", "during the storm", "on Monday morning",
          "at the university", "before lunch", "in a tiny kitchen", "under the bridge", "across the valley"]
ADVERBS = ["carefully", "quickly", "reluctantly", "happily", "twice", "without a word", "for hours", "again"]
QUESTIONS = ["Why does {s} {v} {o}?", "When will {s} finally {vb} {o}?", "How much does {o} cost {p}?",
             "Is it true that {s} {v} {o} {p}?", "Who told {s} about {o}?"]
STATEMENTS = ["{S} {v} {o} {p}.", "{S} {a} {v} {o}.", "{P}, {s} {v} {o}.", "{S} {v} {o} and then {v2} {o2}.",
              "It is said that {s} {v} {o} {a}.", "{S} {v} {n} of {o} {p}."]
INSTRUCTIONS = ["Please {vb} {o} {p}.", "Do not {vb} {o} {a}.", "Remember to {vb} {o} before {n} o'clock."]


def _base(verb: str) -> str:
    return verb[:-2] if verb.endswith("es") and verb[-3] in "sxh" else verb[:-1]


def sentence(rng: np.random.Generator) -> str:
    s, o, o2 = rng.choice(SUBJECTS), rng.choice(OBJECTS), rng.choice(OBJECTS)
    v, v2 = rng.choice(VERBS), rng.choice(VERBS)
    kind = rng.random()
    pool = QUESTIONS if kind < 0.25 else INSTRUCTIONS if kind < 0.4 else STATEMENTS
    text = str(rng.choice(pool)).format(s=s, S=s[0].upper() + s[1:], v=v, v2=v2, vb=_base(v), o=o, o2=o2,
                                        p=rng.choice(PLACES), P=str(rng.choice(PLACES)).capitalize(),
                                        a=rng.choice(ADVERBS), n=int(rng.integers(2, 13)))
    return text


def sentences(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = np.random.default_rng(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        text = sentence(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def tokenize(tokenizer_json: str | Path, texts: list[str], seq: int) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def make_sets(checkpoint: str | Path, out_dir: str | Path, *, n_calib: int = 64, n_eval: int = 200,
              seq: int = 64) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib_texts = sentences(n_calib, seed=11)
    eval_texts = sentences(n_eval, seed=23, exclude=set(calib_texts))
    assert not set(calib_texts) & set(eval_texts)
    tokenizer = Path(checkpoint) / "tokenizer.json"
    paths = {"calib": out / "minilm_calib.npz", "eval": out / "minilm_eval.npz"}
    np.savez(paths["calib"], **tokenize(tokenizer, calib_texts, seq))
    np.savez(paths["eval"], **tokenize(tokenizer, eval_texts, seq))
    (out / "minilm_eval.txt").write_text("\n".join(eval_texts) + "\n")
    return paths


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' pooling: mean of token states where the mask is 1."""
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def embedding_cosine(ref_hidden: np.ndarray, got_hidden: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean, min) over sentences of cos(pooled fp32 embedding, pooled quantized embedding)."""
    a, b = mean_pooled(ref_hidden, mask), mean_pooled(got_hidden, mask)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean()), float(cos.min())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "qcompile" / "data"))
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    for kind, path in make_sets(args.checkpoint, args.out, seq=args.seq).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
