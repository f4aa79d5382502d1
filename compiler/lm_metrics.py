"""Task metrics of causal language models: perplexity and next-token top-1 agreement.

Why: a quantized LLM is judged by what it predicts, not by the SQNR of its logits. A model
is a causal LM here when its graph takes `input_ids` and returns `logits` of rank 3
([batch, sequence, vocabulary]) — the I/O of Hugging Face exports, optimum and
onnxruntime-genai alike; a KV cache beside them is allowed (a window is then a prefill).

Over windows of tokens, position t's logits predict token t+1; positions where either token
is masked (`attention_mask` 0) are skipped. Perplexity = exp(mean negative log-likelihood);
top-1 agreement = the fraction of those positions where the compiled model's most likely
next token is the original's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

IDS, MASK, LOGITS = "input_ids", "attention_mask", "logits"


def is_causal_lm(input_names, outputs: dict[str, tuple]) -> bool:
    """`input_ids` in, `logits` of rank 3 out (`outputs`: name -> shape)."""
    shape = outputs.get(LOGITS)
    return IDS in set(input_names) and shape is not None and len(shape) == 3


def token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(negative log-likelihood of each next token, whether the position counts), both
    [batch, sequence-1]; log-softmax in float64."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    target = np.asarray(ids)[:, 1:]
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    valid = np.ones(target.shape, bool) if mask is None else (np.asarray(mask)[:, :-1] != 0) & (np.asarray(mask)[:, 1:] != 0)
    return log_z - picked, valid


@dataclasses.dataclass
class TokenStats:
    """Streaming perplexity of the original and the compiled model over the same tokens, and
    how often their next-token argmax agrees."""
    nll_reference: float = 0.0
    nll_compiled: float = 0.0
    agree: int = 0
    tokens: int = 0

    def update(self, ids: np.ndarray, mask: np.ndarray | None, reference: np.ndarray, compiled: np.ndarray) -> None:
        nll_ref, valid = token_nll(reference, ids, mask)
        nll_got, _ = token_nll(compiled, ids, mask)
        self.nll_reference += float(nll_ref[valid].sum())
        self.nll_compiled += float(nll_got[valid].sum())
        same = np.asarray(reference)[:, :-1].argmax(-1) == np.asarray(compiled)[:, :-1].argmax(-1)
        self.agree += int(same[valid].sum())
        self.tokens += int(valid.sum())

    @property
    def perplexity_reference(self) -> float:
        return math.exp(self.nll_reference / self.tokens) if self.tokens else float("nan")

    @property
    def perplexity_compiled(self) -> float:
        return math.exp(self.nll_compiled / self.tokens) if self.tokens else float("nan")

    @property
    def perplexity_delta_pct(self) -> float:
        """How much higher the compiled model's perplexity is, in percent of the original's."""
        return 100.0 * (self.perplexity_compiled / self.perplexity_reference - 1.0)

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    def summary(self) -> dict:
        return {"metric": "perplexity", "tokens": self.tokens,
                "perplexity_original": round(self.perplexity_reference, 4),
                "perplexity_compiled": round(self.perplexity_compiled, 4),
                "perplexity_delta_pct": round(self.perplexity_delta_pct, 3),
                "top1_agreement": round(self.top1_agreement, 4)}
