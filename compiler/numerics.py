"""Quantization numerics in one place: integer ranges, scales and zero points,
rounding modes, saturation, quantize/dequantize. Every pass calls these.

Convention (ONNX's): q = saturate(round(x / scale) + zero_point),
x ≈ (q - zero_point) * scale.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# (qmin, qmax, numpy storage dtype, ONNX data type)
INT_TYPES = {
    "int8": (-128, 127, np.int8, ir.DataType.INT8),
    "uint8": (0, 255, np.uint8, ir.DataType.UINT8),
    "int16": (-32768, 32767, np.int16, ir.DataType.INT16),
    "uint16": (0, 65535, np.uint16, ir.DataType.UINT16),
    "int32": (-(2**31), 2**31 - 1, np.int32, ir.DataType.INT32),
}

ROUNDING_MODES = ("half_even", "half_away", "floor", "ceil", "trunc", "stochastic")


def qrange(dtype: str, *, restricted: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range of `dtype`. `restricted` drops the most negative value of a
    signed type (symmetric [-127, 127]); `reduce_range` keeps 7 of 8 bits (the
    onnxruntime option against U8S8 overflow on pre-VNNI x86)."""
    if dtype not in INT_TYPES:
        raise ValueError(f"unknown integer dtype {dtype!r}; known: {', '.join(INT_TYPES)}")
    qmin, qmax = INT_TYPES[dtype][:2]
    if reduce_range:
        if qmin < 0:
            qmin, qmax = qmin // 2, qmax // 2
        else:
            qmax = qmax // 2
    if restricted and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def compute_qparams(lo, hi, dtype: str, *, symmetric: bool, restricted: bool = False,
                    reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (`dtype`) covering [lo, hi] (element-wise).

    The range is widened to include zero so that 0.0 is exactly representable
    (padding and ReLU outputs rely on it).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = qrange(dtype, restricted=restricted and symmetric, reduce_range=reduce_range)
    np_dtype = INT_TYPES[dtype][2]
    if symmetric:
        absmax = np.maximum(-lo, hi)
        if qmin < 0:
            zp = np.zeros_like(absmax)
            half = float(qmax)
        else:
            zp = np.full_like(absmax, (qmin + qmax + 1) // 2)
            half = float(qmax - zp.flat[0]) if zp.size else float(qmax)
        scale = absmax / half
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zp.astype(np_dtype)


def round_values(x: np.ndarray, mode: str = "half_even", rng: np.random.Generator | None = None) -> np.ndarray:
    if mode == "half_even":
        return np.rint(x)
    if mode == "half_away":
        whole = np.trunc(x)
        frac = x - whole  # exact in floating point
        return whole + np.sign(x) * (np.abs(frac) >= 0.5)
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    if mode == "trunc":
        return np.trunc(x)
    if mode == "stochastic":
        if rng is None:
            raise ValueError("stochastic rounding needs a seeded numpy Generator")
        return np.floor(x + rng.random(x.shape, dtype=np.float64))
    raise ValueError(f"unknown rounding mode {mode!r}; known: {', '.join(ROUNDING_MODES)}")


def _along(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel parameter so it broadcasts along `axis`."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)


def quantize(x: np.ndarray, scale, zero_point, dtype: str, *, axis: int | None = None,
             rounding: str = "half_even", rng: np.random.Generator | None = None) -> np.ndarray:
    qmin, qmax, np_dtype, _ = INT_TYPES[dtype]
    x = np.asarray(x, dtype=np.float32)
    s = _along(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _along(np.asarray(zero_point).astype(np.int64), x.ndim, axis)
    q = round_values((x / s).astype(np.float64), rounding, rng) + z
    return np.clip(q, qmin, qmax).astype(np_dtype)


def dequantize(q: np.ndarray, scale, zero_point, *, axis: int | None = None) -> np.ndarray:
    q = np.asarray(q)
    s = _along(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _along(np.asarray(zero_point).astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def reduce_absmax(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over all axes but `axis` (per-channel), or over everything."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return w.min(axis=other), w.max(axis=other)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    err = ref - np.asarray(approx, dtype=np.float64).ravel()
    noise = float(np.dot(err, err))
    signal = float(np.dot(ref, ref))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))
