"""Independent numpy references of the generated CUDA kernels' arithmetic, what check.py
judges a GPU run by (and what tests/test_cuda_kernels.py checks against the CPU family's
kernels and onnxruntime). numpy only: importable on any machine.
"""

from __future__ import annotations

import math

import numpy as np


def ref_quantize_per_token(x: np.ndarray, gamma: np.ndarray | None, eps: float):
    x = x.astype(np.float32)
    if gamma is not None:
        inv = np.float32(1) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps).astype(np.float32)
        x = x * inv * gamma.astype(np.float32)
    s = np.maximum(np.abs(x).max(-1) / np.float32(127), np.float32(1e-12)).astype(np.float32)
    q = np.clip(np.rint(x / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def gelu(v: np.ndarray) -> np.ndarray:
    from math import erf
    return 0.5 * v * (1.0 + np.vectorize(erf)(v / math.sqrt(2.0)))


def ref_gemm_w8a8(q, weight_nk, token_scale, weight_scale, bias, epilogue):
    # float64 products of int8 values summed over K < 2^39 / 127^2 are exact: an integer GEMM at BLAS speed
    acc = q.astype(np.float64) @ weight_nk.astype(np.float64).T
    out = (acc.astype(np.float64) * token_scale.reshape(-1, 1)) * weight_scale.reshape(1, -1)
    if "bias" in epilogue:
        out = out + bias.reshape(1, -1)
    return gelu(out) if "gelu" in epilogue else out


def unpack_int4(packed: np.ndarray, shape, signed: bool) -> np.ndarray:
    flat = packed.reshape(-1)
    lo, hi = (flat & 0x0F).astype(np.int16), (flat >> 4).astype(np.int16)
    values = np.stack([lo, hi], axis=1).reshape(-1)[: int(np.prod(shape))]
    if signed:
        values = np.where(values >= 8, values - 16, values)
    return values.reshape(shape)


def ref_w4a16(x, w, scale, zero_point, bias, group):
    k, n = w.shape
    zp = np.zeros_like(scale) if zero_point is None else zero_point
    deq = (w.astype(np.float64) - np.repeat(zp, group, axis=0)[:k]) * np.repeat(scale, group, axis=0)[:k]
    out = x.astype(np.float64) @ deq
    return out + bias.reshape(1, -1) if bias is not None else out


def quantize_static(x, s):
    return np.clip(np.rint(x.astype(np.float32) / np.float32(s)), -128, 127).astype(np.int8)


def softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def ref_attention_int8(q, k, v, qs, ks, vs, bias, scale, heads, head_dim):
    b, sq, _ = q.shape
    t = k.shape[1]
    split = lambda x, n: x.reshape(b, n, heads, head_dim).transpose(0, 2, 1, 3)  # noqa: E731
    per_head = lambda s: np.broadcast_to(np.asarray(s, np.float32).reshape(-1), (heads,))  # noqa: E731
    qs, ks, vs = per_head(qs), per_head(ks), per_head(vs)
    q8 = np.stack([quantize_static(split(q, sq)[:, h], qs[h]) for h in range(heads)], 1)
    k8 = np.stack([quantize_static(split(k, t)[:, h], ks[h]) for h in range(heads)], 1)
    v8 = np.stack([quantize_static(split(v, t)[:, h], vs[h]) for h in range(heads)], 1)
    scores = np.einsum("bhsd,bhtd->bhst", q8.astype(np.float64), k8.astype(np.float64))
    scores *= (qs * ks).reshape(1, heads, 1, 1) * scale
    if bias is not None:
        scores = scores + bias
    out = np.einsum("bhst,bhtd->bhsd", softmax(scores), v8.astype(np.float64)) * vs.reshape(1, heads, 1, 1)
    return out.transpose(0, 2, 1, 3).reshape(b, sq, heads * head_dim)


def ref_kv_attention(query, key, value, past_k, past_v, key_scale, value_scale, bias, scale, q_heads, kv_heads,
                     head_dim):
    """(output, present_k, present_v): the new rows quantized into the cache, attention over it."""
    ks = np.asarray(key_scale, np.float32).reshape(1, kv_heads, 1, -1)
    vs = np.asarray(value_scale, np.float32).reshape(1, kv_heads, 1, -1)
    new_k = np.clip(np.rint(key.astype(np.float32) / ks), -128, 127).astype(np.int8)
    new_v = np.clip(np.rint(value.astype(np.float32) / vs), -128, 127).astype(np.int8)
    present_k, present_v = np.concatenate([past_k, new_k], 2), np.concatenate([past_v, new_v], 2)
    b, s, _ = query.shape
    group = q_heads // kv_heads
    q = query.astype(np.float64).reshape(b, s, q_heads, head_dim).transpose(0, 2, 1, 3)
    k = np.repeat(present_k.astype(np.float64) * ks, group, axis=1)
    v = np.repeat(present_v.astype(np.float64) * vs, group, axis=1)
    scores = np.einsum("bhsd,bhtd->bhst", q, k) * scale
    if bias is not None:
        scores = scores + bias
    out = np.einsum("bhst,bhtd->bhsd", softmax(scores), v).transpose(0, 2, 1, 3).reshape(b, s, q_heads * head_dim)
    return out, present_k, present_v


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def sqnr_db(got: np.ndarray, want: np.ndarray) -> float:
    noise = float(((got.astype(np.float64) - want.astype(np.float64)) ** 2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(float((want.astype(np.float64) ** 2).sum()) / noise)
