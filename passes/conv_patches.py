"""Conv input patches (im2col) at sampled output positions, for weight algorithms that need a
Conv's input as rows of a matrix — GPTQ's Hessian H = 2·XᵀX / rows, per group of the Conv.

A Conv with weight [Cout, Cin/g, kh, kw] is, per group, a linear map from patches of
Cin/g·kh·kw values to Cout/g outputs; the column order (input channel, tap row, tap column)
is the weight's own flatten order, so `w.reshape(Cout, -1)` lines up with the patch columns.
Feature maps of detection models are large (PP-OCR det: 320×320 early on), so each sample
contributes at most `max_positions` output positions, drawn with a fixed seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs from a 2-D Conv node."""
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]        # top, left, bottom, right
    groups: int

    @classmethod
    def of(cls, node: ir.Node, weight_shape) -> "ConvGeometry | None":
        """The node's geometry, or None where it is not a plain 2-D Conv with explicit pads."""
        if len(weight_shape) != 4:
            return None
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            return None
        ints = lambda key, default: tuple(node.attributes.get_ints(key, default))  # noqa: E731
        pads = ints("pads", (0, 0, 0, 0)) if auto_pad == "NOTSET" else (0, 0, 0, 0)
        return cls(kernel=(int(weight_shape[2]), int(weight_shape[3])), strides=ints("strides", (1, 1)),
                   dilations=ints("dilations", (1, 1)), pads=(pads[0], pads[1], pads[2], pads[3]),
                   groups=node.attributes.get_int("group", 1))


def sampled_patches(x: np.ndarray, geo: ConvGeometry, *, max_positions: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Patches of `x` [N, C, H, W] at up to `max_positions` output positions per sample, as
    [rows, groups, C/groups · kh · kw] (float32: the Gram and error sums built on them run at
    BLAS float32 speed and are accumulated in float64 by their callers)."""
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    top, left, bottom, right = geo.pads
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if any(geo.pads) else x
    positions = oh * ow
    take = min(positions, max_positions)
    rows = []
    for sample in padded:
        flat = rng.choice(positions, size=take, replace=False) if take < positions else np.arange(positions)
        oy, ox = np.divmod(flat, ow)
        ys = oy[:, None] * sh + np.arange(kh)[None, :] * dh                     # [P, kh]
        xs = ox[:, None] * sw + np.arange(kw)[None, :] * dw                     # [P, kw]
        patch = sample[:, ys[:, :, None], xs[:, None, :]]                      # [C, P, kh, kw]
        rows.append(np.moveaxis(patch, 1, 0).reshape(take, geo.groups, (c // geo.groups) * kh * kw))
    return np.concatenate(rows)


def grouped_gram(patches: np.ndarray) -> np.ndarray:
    """XᵀX per group: [rows, G, K] → [G, K, K], computed in the patches' dtype (float32: 2-4×
    faster than float64 here; one batch's rows are a few thousand, so its relative error stays
    near 1e-7) and returned as float64 for accumulation across batches."""
    if patches.shape[1] == 1:
        x = patches[:, 0, :]
        return (x.T @ x)[None].astype(np.float64)
    return np.einsum("pgi,pgj->gij", patches, patches, optimize=True).astype(np.float64)
