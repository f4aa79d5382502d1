"""Layer Hessians from calibration inputs, for the weight algorithms that minimise a layer's
output error on real inputs (GPTQ rounding, SparseGPT pruning).

For a linear y = x·W the error of a changed weight W + Δ on the calibration rows X is
tr(ΔᵀHΔ) with H = 2·XᵀX / rows; layers reading one tensor share it. For a Conv, X is the
input patches (passes/conv_patches.py) at up to `conv_positions` sampled output positions
per sample, one H per group ([G, K, K]). One onnxruntime pass streams every input needed.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from qcompile.errors import DataError, RecipeError

from .activation_stream import batch_rng
from .conv_patches import ConvGeometry, grouped_gram, sampled_patches
from .stream_workers import collect_groups


def is_linear(node: ir.Node) -> bool:
    """A MatMul/Gemm of an activation by a constant 2-D weight (no transA) that sums over more
    than one input channel (K = 1 is an outer product, e.g. a rotary table, not a layer)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or node.inputs[0].const_value is not None:
        return False
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return False
    k = w.const_value.shape[1] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else \
        w.const_value.shape[0]
    return k > 1


def is_conv(node: ir.Node) -> bool:
    """A Conv of an activation by a constant 4-D weight."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Conv" or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    return w is not None and w.const_value is not None and len(w.const_value.shape) == 4 and \
        node.inputs[0].const_value is None


def weight_kn(node: ir.Node) -> tuple[np.ndarray, bool]:
    """A linear's weight as [K, N] float64, and whether it is stored transposed (Gemm transB)."""
    transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    return (w.T if transposed else w), transposed


def rows_per_sample(x: ir.Value) -> int | None:
    if x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    return int(np.prod(x.shape[:-1])) // max(int(x.shape[0]), 1) if len(x.shape) > 1 else 1


def layer_hessians(model: ir.Model, linears: list[ir.Node], convs: dict[str, tuple[ir.Node, ConvGeometry]],
                   ctx, *, samples: int, conv_positions: int, pass_name: str):
    """({input tensor name (linears) or node name (Conv): H}, {same key: rows seen}), float64,
    every layer's at once."""
    hessians, rows = {}, {}
    for found, seen in hessian_groups(model, linears, convs, ctx, samples=samples, conv_positions=conv_positions,
                                      pass_name=pass_name):
        hessians.update(found)
        rows.update(seen)
    return hessians, rows


def hessian_groups(model: ir.Model, linears: list[ir.Node], convs: dict[str, tuple[ir.Node, ConvGeometry]],
                   ctx, *, samples: int, conv_positions: int, pass_name: str, block_ends: bool = False,
                   sequential: bool = False):
    """Yield ({key: H}, {key: rows seen}) as the Hessians complete: all at the end of one
    whole-model stream, or, under --max-memory, block by block — so a caller that rounds and
    drops each group holds one block's Hessians (a 7B layer's are 1.4 GB in float64), not the
    model's. Keys: a linear's input tensor name, a Conv's node name. Under --max-memory,
    `block_ends`: a block's group comes before the next block's session is made (the caller
    must not rewrite the graph until the stream ends); `sequential`: each block's inputs come
    from the blocks before it as the caller rounded them while holding their group (GPTQ's
    sequential order).

    Refuses, before streaming, a linear whose calibration rows cannot reach its width (a
    rank-deficient H); where the sequence length is dynamic that is only known afterwards."""
    dataset = ctx.data
    if dataset is None:
        raise DataError(f"{pass_name} needs calibration data (--calib): its Hessians come from real layer inputs")
    xs = {n.inputs[0].name: n.inputs[0] for n in linears}
    xs.update({node.inputs[0].name: node.inputs[0] for node, _ in convs.values()})
    used = min(samples, dataset.num_samples)
    for n in linears:
        x = n.inputs[0]
        per_sample, width = rows_per_sample(x), x.shape[-1] if x.shape is not None else None
        if per_sample and isinstance(width, int) and used * per_sample < width:
            raise RecipeError(
                f"{used} calibration samples give {used * per_sample} rows of {x.name!r}, fewer than its "
                f"{width} channels: its Hessian would be rank-deficient",
                pass_name=pass_name, key="samples",
                hint=f"{pass_name} needs at least {-(-width // per_sample)} samples here (one row per input "
                     f"channel; several times more is better): pass more --calib data or raise {pass_name}.samples")
    keys_of: dict[str, list[str]] = {n.inputs[0].name: [n.inputs[0].name] for n in linears}   # tensor -> its Hessians
    for key, (node, _) in convs.items():
        keys_of.setdefault(node.inputs[0].name, []).append(key)
    geometry = {key: geo for key, (_, geo) in convs.items()}
    groups = collect_groups(model, list(xs.values()), dataset,
                            functools.partial(GramCollector, keys_of, geometry, conv_positions),
                            samples=samples, label=pass_name, progress=ctx.progress, memory=ctx.memory,
                            sharding=ctx.sharding, block_ends=block_ends, sequential=sequential)
    for grams in groups:
        hessians, rows = {}, {}
        for key in list(grams):        # H = 2·XᵀX / rows, in place: no second copy of a block's Hessians
            gram, n = grams.pop(key)
            np.multiply(gram, 2.0, out=gram)
            np.divide(gram, max(n, 1), out=gram)
            hessians[key], rows[key] = gram, n
        del grams
        yield hessians, rows


class GramCollector:
    """Σ XᵀX and the rows it summed, per Hessian key, over the streamed inputs (a Conv's: its
    input patches at positions sampled per key and batch, the same whichever worker streams
    the batch). Partials add."""

    def __init__(self, keys_of: dict[str, list[str]], convs: dict[str, ConvGeometry], conv_positions: int):
        self.keys_of, self.convs, self.conv_positions = keys_of, convs, conv_positions
        self.acc: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def update(self, name: str, array: np.ndarray, batch: int) -> None:
        for key in self.keys_of[name]:
            if key in self.convs:
                patches = sampled_patches(np.asarray(array), self.convs[key], max_positions=self.conv_positions,
                                          rng=batch_rng(key, batch))
                gram, n_rows = grouped_gram(patches), patches.shape[0]
            else:
                x = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
                gram, n_rows = x.T @ x, x.shape[0]
            if key in self.acc:
                np.add(self.acc[key], gram, out=self.acc[key])   # in place: a 7B down_proj's sum is 970 MB
            else:
                self.acc[key] = gram
            self.count[key] = self.count.get(key, 0) + n_rows

    def take(self, names: set[str]) -> dict[str, tuple[np.ndarray, int]]:
        return {k: (self.acc.pop(k), self.count.pop(k)) for t in names for k in self.keys_of[t] if k in self.acc}

    @staticmethod
    def merge(parts: list[dict]) -> dict[str, tuple[np.ndarray, int]]:
        merged: dict[str, tuple[np.ndarray, int]] = {}
        for part in parts:
            for key, (gram, n) in part.items():
                merged[key] = (merged[key][0] + gram, merged[key][1] + n) if key in merged else (gram, n)
        return merged
