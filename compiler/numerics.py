"""Quantization numerics in one place: integer and float8 ranges, scales and zero
points, rounding modes, saturation, quantize/dequantize (per-tensor, per-channel,
blocked), and the run-time dynamic schemes. Every pass calls these.

Convention (ONNX's): q = saturate(round(x / scale) + zero_point),
x ≈ (q - zero_point) * scale.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

# (qmin, qmax, numpy storage dtype, ONNX data type). int4/uint4 are held as
# int8/uint8 nibble values while computing; `to_storage` gives the ONNX form.
INT_TYPES = {
    "int4": (-8, 7, np.int8, ir.DataType.INT4),
    "uint4": (0, 15, np.uint8, ir.DataType.UINT4),
    "int8": (-128, 127, np.int8, ir.DataType.INT8),
    "uint8": (0, 255, np.uint8, ir.DataType.UINT8),
    "int16": (-32768, 32767, np.int16, ir.DataType.INT16),
    "uint16": (0, 65535, np.uint16, ir.DataType.UINT16),
    "int32": (-(2**31), 2**31 - 1, np.int32, ir.DataType.INT32),
}

# (largest finite value, numpy dtype, ONNX data type)
FLOAT8_TYPES = {
    "float8e4m3fn": (448.0, ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN),
    "float8e5m2": (57344.0, ml_dtypes.float8_e5m2, ir.DataType.FLOAT8E5M2),
}

DTYPES = (*INT_TYPES, *FLOAT8_TYPES)

ROUNDING_MODES = ("half_even", "half_away", "floor", "ceil", "trunc", "stochastic")


def _check_dtype(dtype: str) -> None:
    if dtype not in INT_TYPES and dtype not in FLOAT8_TYPES:
        raise ValueError(f"unknown quantized dtype {dtype!r}; known: {', '.join(DTYPES)}")


def is_float8(dtype: str) -> bool:
    _check_dtype(dtype)
    return dtype in FLOAT8_TYPES


def onnx_dtype(dtype: str) -> ir.DataType:
    _check_dtype(dtype)
    return FLOAT8_TYPES[dtype][2] if dtype in FLOAT8_TYPES else INT_TYPES[dtype][3]


def bits(dtype: str) -> int:
    """Width of one element as stored by ONNX (int4 is 4 although numpy holds it in 8)."""
    _check_dtype(dtype)
    if dtype in FLOAT8_TYPES:
        return 8
    qmin, qmax = INT_TYPES[dtype][:2]
    return (qmax - qmin).bit_length()


def to_storage(q: np.ndarray, dtype: str) -> np.ndarray:
    """The array to put in an ONNX initializer. int4/uint4 become ml_dtypes'
    4-bit types so that onnx_ir tags them INT4/UINT4 and packs two per byte;
    every other dtype is stored as computed."""
    _check_dtype(dtype)
    q = np.asarray(q)
    if dtype == "int4":
        return q.astype(ml_dtypes.int4)
    if dtype == "uint4":
        return q.astype(ml_dtypes.uint4)
    return q


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
    (padding and ReLU outputs rely on it). float8 is symmetric only: its grid is
    already symmetric and ONNX fixes its zero point at 0, so the scale maps the
    absolute maximum onto the largest finite value; `restricted` and
    `reduce_range` are integer-grid options and do not apply to it.
    """
    _check_dtype(dtype)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if dtype in FLOAT8_TYPES:
        if not symmetric:
            raise ValueError(f"float8 quantization is symmetric (zero point 0); "
                             f"{dtype} cannot be asymmetric")
        max_finite, np_dtype, _ = FLOAT8_TYPES[dtype]
        scale = np.maximum(-lo, hi) / max_finite
        return np.where(scale > 0, scale, 1.0).astype(np.float32), np.zeros(scale.shape, dtype=np_dtype)
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


def _blocks(n: int, block_size: int) -> int:
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return -(-n // int(block_size))


def _expand(param, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """A scale or zero point in the shape that broadcasts against x: per-tensor,
    per-channel along `axis`, or blocked (DequantizeLinear-21: one value per
    `block_size` consecutive elements along `axis`, a last partial block allowed)."""
    if block_size is None:
        return _along(param, len(shape), axis)
    param = np.asarray(param)
    if axis is None:
        raise ValueError("blocked quantization needs the axis the blocks run along")
    axis = axis % len(shape)
    want = list(shape)
    want[axis] = _blocks(shape[axis], block_size)
    if param.shape != tuple(want):
        raise ValueError(f"blocked parameter of shape {list(param.shape)} does not fit x of shape "
                         f"{list(shape)} with block_size {block_size} along axis {axis}: expected {want}")
    full = np.repeat(param, int(block_size), axis=axis)
    return np.take(full, np.arange(shape[axis]), axis=axis)


def block_minmax(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of each block of `block_size` consecutive elements along `axis`,
    for every index of the other axes: the DequantizeLinear-21 scale layout,
    w.shape with dim `axis` -> ceil(n / block_size). A group size that does not
    divide the axis leaves a last, shorter block."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    if _blocks(w.shape[axis], block_size) == 0:
        raise ValueError("block_minmax over an empty axis")
    starts = np.arange(0, w.shape[axis], int(block_size))
    return np.minimum.reduceat(w, starts, axis=axis), np.maximum.reduceat(w, starts, axis=axis)


def quantize(x: np.ndarray, scale, zero_point, dtype: str, *, axis: int | None = None,
             block_size: int | None = None, rounding: str = "half_even",
             rng: np.random.Generator | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: x / scale in float32, then round and saturate.

    float8 targets round to nearest even only (the cast ONNX defines) and
    saturate to the largest finite value, since a plain cast would give NaN or
    inf out of range; they come back as ml_dtypes float8 arrays."""
    _check_dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    along = _slicing_axis(x, axis)
    if rng is None and along is not None:
        return _quantize_in_slices(x, scale, zero_point, dtype, axis, block_size, rounding, along)
    s = _expand(np.asarray(scale, dtype=np.float32), x.shape, axis, block_size)
    if dtype in FLOAT8_TYPES:
        if rounding != "half_even":
            raise ValueError(f"float8 quantization rounds to nearest even only; rounding={rounding!r} "
                             f"is not available for {dtype}")
        max_finite, np_dtype, _ = FLOAT8_TYPES[dtype]
        z = np.asarray(zero_point).astype(np.float32)
        v = x / s
        if np.any(z != 0):  # ONNX fixes it at 0; adding +0 would also turn -0 into +0
            v = (v + _expand(z, x.shape, axis, block_size)).astype(np.float32)
        return np.clip(v, -max_finite, max_finite).astype(np_dtype)
    qmin, qmax, np_dtype, _ = INT_TYPES[dtype]
    z = _expand(np.asarray(zero_point).astype(np.int64), x.shape, axis, block_size)
    q = round_values((x / s).astype(np.float64), rounding, rng) + z
    return np.clip(q, qmin, qmax).astype(np_dtype)


SLICE_ELEMENTS = 1 << 23   # a tensor larger than this is quantized in slices of about this many elements


def _slicing_axis(x: np.ndarray, axis: int | None) -> int | None:
    """The axis to slice a large `x` along (one its scales do not run along), or None."""
    if x.size <= SLICE_ELEMENTS or x.ndim < 2:
        return None
    along = 1 if axis is not None and axis % x.ndim == 0 else 0
    return along if x.shape[along] > 1 else None


def _quantize_in_slices(x, scale, zero_point, dtype, axis, block_size, rounding, along) -> np.ndarray:
    """`quantize` of a large tensor one slice at a time: the same values, with the float64 and
    expanded-scale temporaries of one slice (a 7B lm_head whole took ~3 GB of them)."""
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point)
    step = max(1, SLICE_ELEMENTS // (x.size // x.shape[along]))
    parts = []
    for start in range(0, x.shape[along], step):
        idx = [slice(None)] * x.ndim
        idx[along] = slice(start, start + step)
        idx = tuple(idx)
        # blocked parameters are full-rank, sliced with x; per-tensor/per-channel ones apply as they are
        s = scale[idx] if block_size is not None else scale
        z = zero_point[idx] if block_size is not None and zero_point.ndim == x.ndim else zero_point
        parts.append(quantize(x[idx], s, z, dtype, axis=axis, block_size=block_size, rounding=rounding))
    return np.concatenate(parts, axis=along)


def dequantize(q: np.ndarray, scale, zero_point, *, axis: int | None = None,
               block_size: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear, float32: (q - zero_point) * scale."""
    q = np.asarray(q)
    s = _expand(np.asarray(scale, dtype=np.float32), q.shape, axis, block_size)
    z = np.asarray(zero_point)
    if q.dtype in {np.dtype(t[1]) for t in FLOAT8_TYPES.values()}:
        z = _expand(z.astype(np.float32), q.shape, axis, block_size)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)
    z = _expand(z.astype(np.int64), q.shape, axis, block_size)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def fake_quantize(x: np.ndarray, scale, zero_point, dtype: str, *, axis: int | None = None) -> np.ndarray:
    """dequantize(quantize(x)), per tensor or per channel, round half to even. For an
    8-bit-or-narrower integer dtype the same float32 values computed in float32 in place (a
    search that simulates int8 error many times over a 7B's weights spends its time here);
    other dtypes (float8, int16) go through quantize and dequantize."""
    if dtype not in INT_TYPES or INT_TYPES[dtype][1] - INT_TYPES[dtype][0] > 255:
        return dequantize(quantize(x, scale, zero_point, dtype, axis=axis), scale, zero_point, axis=axis)
    qmin, qmax, _, _ = INT_TYPES[dtype]
    x = np.asarray(x, dtype=np.float32)
    s = _along(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _along(np.asarray(zero_point).astype(np.float32), x.ndim, axis)
    q = np.divide(x, s)            # float32, as QuantizeLinear divides
    np.rint(q, out=q)              # rint of a float32 is exact: the float64 detour of quantize() changes nothing
    q += z                         # integers below 2**24: exact in float32
    np.clip(q, qmin, qmax, out=q)
    q -= z
    q *= s
    return q


def dynamic_quantize_per_token(x: np.ndarray, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """What a run-time per-token symmetric quantizer computes along the last axis,
    in float32 step for step as the ONNX graph Abs -> ReduceMax(axes=[-1],
    keepdims=1) -> Div(qmax) -> Max(1e-12) -> Div(x, s) -> Round -> Clip(±qmax),
    so that a simulation agrees with the deployed graph bit for bit. The floor on
    the scale keeps an all-zero token from dividing by zero. q is int8 (int4
    values too); scale has shape x.shape[:-1] + (1,)."""
    if dtype not in ("int8", "int4"):
        raise ValueError(f"per-token dynamic quantization is symmetric int8 or int4, got {dtype!r}")
    qmax = np.float32(INT_TYPES[dtype][1])
    x = np.asarray(x, dtype=np.float32)
    absmax = np.max(np.abs(x), axis=-1, keepdims=True)
    s = np.maximum(absmax / qmax, np.float32(1e-12)).astype(np.float32)
    q = np.clip(np.rint(x / s), -qmax, qmax)
    return q.astype(np.int8), s


def dynamic_quantize_per_tensor_uint8(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """numpy twin of ONNX DynamicQuantizeLinear (uint8, per tensor, asymmetric),
    float32 throughout: the range is widened to include 0, scale = (max - min) /
    255, zero point = round(saturate(-min / scale)). An all-zero input gets scale
    1, as onnxruntime gives it."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.minimum(x.min(initial=np.float32(0)), np.float32(0))
    hi = np.maximum(x.max(initial=np.float32(0)), np.float32(0))
    scale = np.float32(1) if hi == lo else np.float32((hi - lo) / np.float32(255))
    zp = np.uint8(np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)))
    q = np.clip(np.rint(x / scale) + np.float32(zp), 0, 255).astype(np.uint8)
    return q, scale, zp


def reduce_absmax(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over all axes but `axis` (per-channel), or over everything."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return w.min(axis=other), w.max(axis=other)
def full_range_qparams(lo, hi, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scales that map each range's largest-magnitude end to qmin (-8 for int4),
    the sign carried by the scale (so scales may be negative), zero point 0: all 2^bits
    levels in use instead of 2^bits - 1. The convention of onnxruntime's blockwise RTN and
    llama.cpp's q4_0; the opposite end may clip by at most one step."""
    qmin = INT_TYPES[dtype][0]
    if qmin >= 0:
        raise ValueError(f"full-range symmetric scales need a signed dtype, got {dtype!r}")
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    extreme = np.where(np.abs(lo) >= np.abs(hi), lo, hi)
    scale = np.where(extreme != 0, extreme / qmin, 1.0).astype(np.float32)
    return scale, np.zeros(scale.shape, dtype=INT_TYPES[dtype][2])
