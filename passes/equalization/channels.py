"""Per-channel scale arithmetic shared by the equalization passes (smooth_quant, awq,
equalize_outputs, cle): which constants can take a per-channel factor, how a factor vector is
shaped against an activation's channel axis, and how a linear's or Conv's weights are scaled
along the input channels an activation feeds (grouped and depthwise Convs: each group's own)."""

from __future__ import annotations

import numpy as np


def per_channel_shape(c: np.ndarray, rank: int, channel_axis: int) -> bool:
    """True when c broadcast against [C] on X's channel axis stays C values (one value, or one per channel)."""
    if c.size == 1:
        return True
    axis = channel_axis % rank
    want = [1] * rank
    want[axis] = c.size
    return list((1,) * (rank - c.ndim) + c.shape) == want


def channel_shaped(s: np.ndarray, rank: int, channel_axis: int) -> np.ndarray:
    """s [C] reshaped to broadcast along X's channel axis ((C, 1, 1) for NCHW)."""
    return s.reshape((-1,) + (1,) * (rank - 1 - channel_axis % rank))


def input_channel_absmax(w: np.ndarray, k_axis: int, groups: int | None) -> np.ndarray:
    """max |W| over everything X's channel j multiplies. A MatMul/Gemm weight (`groups` None):
    along its `k_axis`; a Conv weight [Cout, Cin/g, kh, kw] with `groups`: its group's outputs and taps."""
    if groups is None:
        return np.abs(np.moveaxis(w, k_axis, 0)).reshape(w.shape[k_axis], -1).max(axis=1)
    per = np.abs(w).reshape(groups, w.shape[0] // groups, w.shape[1], -1)       # [G, Cout/g, Cin/g, taps]
    return per.max(axis=(1, 3)).reshape(-1)


def scale_input_channels(w: np.ndarray, s: np.ndarray, k_axis: int, groups: int | None) -> np.ndarray:
    """W with input channel j's weights multiplied by s_j (X·W unchanged once X is divided by s);
    `k_axis` / `groups` as in input_channel_absmax."""
    if groups is None:
        shape = [1] * w.ndim
        shape[k_axis] = -1
        return w * s.reshape(shape)
    per = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
    return (per * s.reshape(groups, 1, w.shape[1], 1, 1)).reshape(w.shape)


def times_channels(c: np.ndarray, factor: np.ndarray, rank: int) -> np.ndarray:
    """A one-value or per-channel constant (per_channel_shape) times a channel_shaped factor,
    in the constant's dtype: a scalar becomes one value per channel."""
    base = c.reshape(-1)[0] if c.size == 1 else c.reshape((1,) * (rank - c.ndim) + c.shape)
    return np.asarray(base * factor, dtype=c.dtype)
