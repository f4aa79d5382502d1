"""The Ascend quantization operators' arithmetic in numpy, in one place.

These are the semantics the lowering builds parameters for and the reference lowering
(`reference.py`) reproduces in standard ONNX; the tests check both against an independent
implementation. Sources: the CANN "supported ONNX operators" pages for AscendQuant,
AscendDequant and AscendAntiQuant, and the TBE `ascend_quant` kernel source (it casts a
float32 input to float16 and multiplies by a float16 scale — hence `sqrt_mode` for
scales beyond the float16 range).

* AscendQuant:     y = saturate_int8(round(x * scale + offset))  (`sqrt_mode`: x * scale * scale)
* AscendDequant:   y = float(x_int32) * deq,  deq = the float32 whose bits sit in the low
                   32 bits of each uint64 of `deq_scale` (high 32 bits zero)
* AscendAntiQuant: y = float16((x_int8 + offset) * scale)
"""

from __future__ import annotations

import numpy as np

from qcompile.numerics import round_values

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
ROUND_MODES = ("Round", "Floor", "Ceil", "Trunc")  # Round = half to even
INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_LOW32 = np.uint64(0xFFFFFFFF)


# -- deq_scale: float32 bits in the low half of a uint64 --------------------------------------
def pack_deq_scale(deq) -> np.ndarray:
    """float32 scale(s) -> uint64 with the float32 bit pattern in the low 32 bits, high bits 0."""
    f = np.ascontiguousarray(np.asarray(deq, dtype=np.float32).reshape(-1))
    return f.view(np.uint32).astype(np.uint64)


def unpack_deq_scale(packed) -> np.ndarray:
    """uint64 deq_scale -> float32. Refuses high bits (AscendRequant's offset/shift fields)."""
    u = np.asarray(packed, dtype=np.uint64).reshape(-1)
    if np.any(u >> np.uint64(32)):
        raise ValueError("deq_scale has bits set above the low 32 (a requant scale with offset/shift "
                         "fields), not a plain AscendDequant scale")
    return np.ascontiguousarray((u & _LOW32).astype(np.uint32)).view(np.float32)


# -- AscendQuant ------------------------------------------------------------------------------
def quant_attributes(x_scale: float, x_zero_point: int = 0, *, round_mode: str = "Round",
                     compute_dtype: str = "float16") -> dict:
    """AscendQuant attributes for ONNX qparams (scale s_x, zero point zp_x).

    scale = 1/s_x, offset = zp_x. When the kernel computes in float16 and 1/s_x is beyond the
    float16 range, store sqrt(1/s_x) with `sqrt_mode` (the kernel multiplies twice).
    """
    if round_mode not in ROUND_MODES:
        raise ValueError(f"round_mode {round_mode!r} is not one of {', '.join(ROUND_MODES)}")
    s = float(x_scale)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"activation scale must be positive and finite, got {s}")
    inv = 1.0 / s
    sqrt_mode = compute_dtype == "float16" and inv > FP16_MAX
    scale = float(np.float32(np.sqrt(inv) if sqrt_mode else inv))
    return {"scale": scale, "offset": float(x_zero_point), "sqrt_mode": int(sqrt_mode), "round_mode": round_mode}


# AscendQuant's round_mode -> compiler/numerics.py's rounding mode of the same arithmetic
_NUMERICS_ROUNDING = {"Round": "half_even", "Floor": "floor", "Ceil": "ceil", "Trunc": "trunc"}


def round_mode_values(v: np.ndarray, mode: str) -> np.ndarray:
    if mode not in _NUMERICS_ROUNDING:
        raise ValueError(f"round_mode {mode!r} is not one of {', '.join(ROUND_MODES)}")
    return round_values(v, _NUMERICS_ROUNDING[mode])


def ascend_quant(x, scale: float, offset: float = 0.0, *, sqrt_mode: bool = False, round_mode: str = "Round",
                 compute_dtype: str = "float16") -> np.ndarray:
    """AscendQuant: float -> int8, arithmetic in `compute_dtype` (float16 as the TBE kernel)."""
    dt = np.float16 if compute_dtype == "float16" else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.asarray(x).astype(dt) * dt(scale)
        if sqrt_mode:
            v = v * dt(scale)
        if offset:
            v = v + dt(offset)
        v = round_mode_values(v, round_mode)
    return np.clip(v, INT8_MIN, INT8_MAX).astype(np.int8)


# -- AscendDequant ----------------------------------------------------------------------------
def ascend_dequant(x, deq_scale_u64, *, sqrt_mode: bool = False, relu_flag: bool = False, dtype: int = 0,
                   channel_axis: int = 1) -> np.ndarray:
    """AscendDequant: int32 -> float32 (dtype 0) or float16 (dtype 1), per-channel along NCHW's C."""
    x = np.asarray(x)
    deq = unpack_deq_scale(deq_scale_u64)
    if deq.size > 1:
        shape = [1] * x.ndim
        shape[channel_axis] = deq.size
        deq = deq.reshape(shape)
    else:
        deq = deq.reshape(())
    y = x.astype(np.float32) * deq
    if sqrt_mode:
        y = y * deq
    if relu_flag:
        y = np.maximum(y, np.float32(0))
    with np.errstate(over="ignore"):
        return y.astype(np.float16) if dtype == 1 else y.astype(np.float32)


# -- AscendAntiQuant --------------------------------------------------------------------------
def ascend_anti_quant(x, scale: float, offset: float = 0.0, *, sqrt_mode: bool = False) -> np.ndarray:
    """AscendAntiQuant: int8 -> float16, y = (x + offset) * scale in float16."""
    v = np.asarray(x).astype(np.float16) + np.float16(offset)
    v = v * np.float16(scale)
    if sqrt_mode:
        v = v * np.float16(scale)
    return v.astype(np.float16)


# -- int32 bias -------------------------------------------------------------------------------
def bias_to_int32(bias, deq) -> tuple[np.ndarray | None, float]:
    """round(bias / (s_x*s_w)) as int32, or None when it does not fit; also the largest |q|."""
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    d = np.asarray(deq, dtype=np.float32).astype(np.float64).reshape(-1)
    if d.size == 1 and b.size > 1:
        d = np.full(b.shape, d[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(b / d)
    worst = float(np.max(np.abs(q))) if q.size else 0.0
    if not np.all(np.isfinite(q)) or q.min(initial=0) < INT32_MIN or q.max(initial=0) > INT32_MAX:
        return None, worst
    return q.astype(np.int32), worst
