"""Per-channel activation statistics for the equalization passes, in one streaming pass over
the calibration data: each tensor's per-channel extremes and a seeded sample of its rows (or,
for Conv inputs, input patches) that a scale search can simulate X·W on."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from qcompile.calib_data import model_input_specs, open_dataset

from ..activation_stream import batch_rng
from ..conv_patches import ConvGeometry, sampled_patches
from ..stream_workers import collect_groups


def channel_stats(model: ir.Model, xs: list[ir.Value], ctx, *, samples: int, rows: int, label: str,
                  conv_inputs: dict[str, list[ConvGeometry]] | None = None, channel_axis: int | None = None):
    """Every X's statistics at once (channel_stat_groups, merged)."""
    ranges, kept = {}, {}
    for found, sampled in channel_stat_groups(model, xs, ctx, samples=samples, rows=rows, label=label,
                                              conv_inputs=conv_inputs, channel_axis=channel_axis):
        ranges.update(found)
        kept.update(sampled)
    return ranges, kept


def channel_stat_groups(model: ir.Model, xs: list[ir.Value], ctx, *, samples: int, rows: int, label: str,
                        conv_inputs: dict[str, list[ConvGeometry]] | None = None, channel_axis: int | None = None):
    """Yield ({X: per-channel (min, max)}, {X: a random sample of up to `rows` of its rows}) as
    the statistics complete: all at the end of a whole-model stream, or, under --max-memory,
    block by block — so a caller that uses and drops each group holds one block's samples
    (a 7B decoder's are 6 GB in all), not the model's.

    Channels are X's last axis, or `channel_axis`; an X named in `conv_inputs` is NCHW (channels
    on axis 1) and its sample is, per Conv reading it, that Conv's input patches
    [rows, groups, Cin/g·kh·kw] at sampled output positions. Rows are sampled per tensor and
    batch (ChannelStatCollector), so the same rows are taken whatever order the batches come in
    and whichever worker (--workers) streams them."""
    conv_inputs = conv_inputs or {}
    dataset = ctx.data
    if dataset is None:
        dataset = open_dataset(None, model_input_specs(model), synthetic_samples=8)
        ctx.warn(f"{label} without calibration data: channel statistics from synthetic inputs")
    per_batch_rows = max(16, rows // max(min(samples, dataset.num_samples), 1))
    collector = functools.partial(ChannelStatCollector, rows, per_batch_rows, conv_inputs, channel_axis)
    for stats in collect_groups(model, xs, dataset, collector, samples=samples, label=label, progress=ctx.progress,
                                memory=ctx.memory, sharding=ctx.sharding):
        ranges, sampled = {}, {}
        for name, (lo, hi, kept) in stats.items():
            ranges[name] = (lo, hi)
            if kept:
                sampled[name] = _first_rows(kept, rows, conv=name in conv_inputs)
        yield ranges, sampled


class ChannelStatCollector:
    """Each X's per-channel extremes and a sample of its rows. A batch's rows are drawn by a
    generator seeded with (X, batch index), up to `per_batch_rows` whatever the other batches
    gave, and the sample is the first `rows` of them in batch order: partials of different
    workers merge to the one-process sample exactly."""

    def __init__(self, rows: int, per_batch_rows: int, conv_inputs: dict[str, list[ConvGeometry]],
                 channel_axis: int | None):
        self.rows, self.per_batch_rows = rows, per_batch_rows
        self.conv_inputs, self.channel_axis = conv_inputs, channel_axis
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}
        self.kept: dict[str, list[tuple[int, object]]] = {}   # X -> [(batch, its rows or patches per Conv)]
        self.count: dict[str, int] = {}

    def update(self, name: str, array: np.ndarray, batch: int) -> None:
        geos = self.conv_inputs.get(name)
        array = np.asarray(array, dtype=np.float32)
        axis = self.channel_axis
        channel = 1 if geos else (axis % array.ndim if axis is not None else array.ndim - 1)
        others = tuple(i for i in range(array.ndim) if i != channel)
        mn, mx = array.min(axis=others), array.max(axis=others)
        self.lo[name] = mn if name not in self.lo else np.minimum(self.lo[name], mn)
        self.hi[name] = mx if name not in self.hi else np.maximum(self.hi[name], mx)
        if self.count.get(name, 0) >= self.rows:   # later batches fall past the first `rows` rows
            return
        rng = batch_rng(name, batch)
        if geos:
            positions = max(1, self.per_batch_rows // array.shape[0])
            sample = [sampled_patches(array, geo, max_positions=positions, rng=rng) for geo in geos]
            taken = sample[0].shape[0]
        else:
            flat = array.reshape(-1, array.shape[-1])
            taken = min(self.per_batch_rows, flat.shape[0])
            sample = flat[rng.permutation(flat.shape[0])[:taken]]
        self.kept.setdefault(name, []).append((batch, sample))
        self.count[name] = self.count.get(name, 0) + taken

    def take(self, names: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray, list]]:
        for n in names:
            self.count.pop(n, None)
        return {n: (self.lo.pop(n), self.hi.pop(n), self.kept.pop(n, [])) for n in names if n in self.lo}

    @staticmethod
    def merge(parts: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, list]]:
        merged: dict[str, tuple[np.ndarray, np.ndarray, list]] = {}
        for part in parts:
            for name, (lo, hi, kept) in part.items():
                if name in merged:
                    mlo, mhi, mkept = merged[name]
                    merged[name] = (np.minimum(mlo, lo), np.maximum(mhi, hi), mkept + kept)
                else:
                    merged[name] = (lo, hi, list(kept))
        return merged


def _first_rows(kept: list[tuple[int, object]], rows: int, *, conv: bool):
    """The first `rows` sampled rows in batch order (per Conv reading X, for a Conv input)."""
    ordered = [sample for _, sample in sorted(kept, key=lambda item: item[0])]
    if conv:
        return [np.concatenate(per)[:rows] for per in zip(*ordered)]
    return np.concatenate(ordered)[:rows]
