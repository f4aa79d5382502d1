"""Per-channel activation statistics for the equalization passes, in one streaming pass over
the calibration data: each tensor's per-channel extremes and a seeded sample of its rows (or,
for Conv inputs, input patches) that a scale search can simulate X·W on."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.calib_data import model_input_specs, open_dataset

from ..activation_stream import stream_tensors, tensor_groups, tensor_rng
from ..conv_patches import ConvGeometry, sampled_patches


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
    [rows, groups, Cin/g·kh·kw] at sampled output positions. Rows are sampled per tensor, so the
    same rows are taken whatever order the batches come in."""
    conv_inputs = conv_inputs or {}
    dataset = ctx.data
    if dataset is None:
        dataset = open_dataset(None, model_input_specs(model), synthetic_samples=8)
        ctx.warn(f"{label} without calibration data: channel statistics from synthetic inputs")
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {}
    count: dict[str, int] = {}
    rngs = {x.name: tensor_rng(x.name) for x in xs}
    per_batch_rows = max(16, rows // max(min(samples, dataset.num_samples), 1))
    stream = stream_tensors(model, xs, dataset, samples=samples, label=label, progress=ctx.progress,
                            memory=ctx.memory)
    for arrays, finished in tensor_groups(stream):
        if finished:
            yield _finish(finished, lo, hi, kept, count, conv_inputs)
        for name, array in arrays.items():
            geos = conv_inputs.get(name)
            array = np.asarray(array, dtype=np.float32)
            channel = 1 if geos else (channel_axis % array.ndim if channel_axis is not None else array.ndim - 1)
            others = tuple(i for i in range(array.ndim) if i != channel)
            mn, mx = array.min(axis=others), array.max(axis=others)
            lo[name] = mn if name not in lo else np.minimum(lo[name], mn)
            hi[name] = mx if name not in hi else np.maximum(hi[name], mx)
            have = count.get(name, 0)
            if have >= rows:
                continue
            if geos:
                positions = max(1, min(per_batch_rows, rows - have) // array.shape[0])
                patches = [sampled_patches(array, geo, max_positions=positions, rng=rngs[name]) for geo in geos]
                kept.setdefault(name, []).append(patches)
                count[name] = have + patches[0].shape[0]
            else:
                flat = array.reshape(-1, array.shape[-1])
                take = rngs[name].choice(flat.shape[0], min(per_batch_rows, flat.shape[0], rows - have),
                                         replace=False)
                kept.setdefault(name, []).append(flat[take])
                count[name] = have + len(take)


def _finish(names, lo, hi, kept, count, conv_inputs):
    """The finished tensors' (ranges, sampled rows), taken out of the running state."""
    ranges = {n: (lo.pop(n), hi.pop(n)) for n in names}
    sampled = {}
    for n in names:
        count.pop(n, None)
        r = kept.pop(n, [])
        if r:
            sampled[n] = [np.concatenate(per) for per in zip(*r)] if n in conv_inputs else np.concatenate(r)
    return ranges, sampled
