"""calibrate: stream calibration batches through onnxruntime and observe ranges.

One session over the model exposes exactly the tensors later passes asked ranges
for; each batch updates a fixed-size histogram per tensor and is then dropped, so
memory does not grow with the number of samples.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Literal

import onnx_ir as ir

from qcompile.calib_data import model_input_specs, open_dataset
from qcompile.observers import HistogramObserver
from qcompile.ort_session import session_for
from qcompile.progress import progress_bar
from qcompile.registry import QPass, register_pass


@register_pass("calibrate")
class Calibrate(QPass):
    """Observe activation ranges on calibration data (min-max, percentile, entropy, MSE)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
        percentile: float = 99.999
        samples: int = 256              # at most this many samples are used
        batch_size: int = 1             # used when the model's batch dimension is dynamic
        bins: int = 2048
        synthetic_samples: int = 8      # data-free mode (no --calib)

        def validate(self):
            if not 50.0 < self.percentile <= 100.0:
                return "percentile", f"must be in (50, 100], got {self.percentile}"
            if self.samples < 1:
                return "samples", "must be at least 1"
            if self.batch_size < 1:
                return "batch_size", "must be at least 1"
            if self.bins < 128:
                return "bins", "must be at least 128"
            return None

    @classmethod
    def gives(cls, config) -> set[str]:
        return {"ranges"}

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        ctx.calibration = cfg
        values = _values_by_name(model)
        wanted = [values[n] for n in sorted(ctx.range_requests) if n in values and n not in ctx.stats]
        if not wanted:
            note = "no pass asked for ranges" if not ctx.range_requests else \
                "every requested range came from an earlier compile of the same model and data"
            ctx.report["calibrate"] = {"tensors": 0, "samples": 0, "reused": len(ctx.range_requests), "note": note}
            return False
        dataset = ctx.calib
        if dataset is None:
            dataset = open_dataset(None, model_input_specs(model), synthetic_samples=cfg.synthetic_samples)
            ctx.warn(f"no calibration data: calibrating on {cfg.synthetic_samples} synthetic samples. "
                     "Activation ranges from random inputs rarely match real data; expect a large "
                     "accuracy loss. Pass --calib data.npz for a real compile.")
        names = [v.name for v in wanted]
        observers = {n: HistogramObserver(cfg.bins) for n in names}
        seen = 0
        for arrays, n in stream_tensors(model, wanted, dataset, samples=cfg.samples, label="calibrate",
                                        progress=ctx.progress, batch_size=cfg.batch_size):
            for name, array in arrays.items():
                observers[name].update(array)
                if name in ctx.channel_axes:
                    observers[name].update_channels(array, ctx.channel_axes[name])
            seen += n
        ctx.stats.update(observers)
        nonfinite = sorted(n for n, o in observers.items() if o.nonfinite)
        if nonfinite:
            ctx.warn(f"{len(nonfinite)} tensors held Inf/NaN during calibration (e.g. {nonfinite[0]}); "
                     "those values are left out of their ranges")
        ctx.report["calibrate"] = {"tensors": len(names), "samples": seen, "method": cfg.method,
                                   "data": dataset.description}
        return False


def stream_tensors(model: ir.Model, values: list[ir.Value], dataset, *, samples: int, label: str,
                   progress: bool, batch_size: int = 1):
    """Yield ({tensor name: array}, batch samples) for `values` over up to `samples` samples of
    `dataset`: one onnxruntime session exposing them, the model's fixed batch size if it has one,
    a progress bar, and onnxruntime running batch i+1 (it releases the GIL) while the caller
    works on batch i. Every pass that reads activations (calibrate, smooth_quant, gptq, awq)
    streams them through here."""
    session = session_for(model, extra_outputs=values, level="basic")
    names = [v.name for v in values]
    batch, fixed = fixed_batch_size(model)
    total = min(samples, dataset.num_samples)
    with progress_bar(label, total, enabled=progress) as advance:
        for feed, outputs in _prefetched(session, names, dataset.batches(batch or batch_size, limit=samples,
                                                                          exact=fixed)):
            n = next(iter(feed.values())).shape[0]
            yield dict(zip(names, outputs)), n
            advance(n)


def _prefetched(session, names, feeds):
    """Yield (feed, outputs), computing the next batch's outputs in a worker thread.

    At most two batches of activations are alive at once, so memory stays flat.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed in feeds:
            future = pool.submit(session.run, names, feed)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (feed, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            values[out.name] = out
    return values


def fixed_batch_size(model: ir.Model) -> tuple[int | None, bool]:
    """(the model's fixed batch size, True) if axis 0 of its inputs is pinned, else (None, False)."""
    sizes = {v.shape[0] for v in model.graph.inputs
             if v.shape is not None and len(v.shape) > 0 and v.name not in model.graph.initializers}
    fixed = [s for s in sizes if isinstance(s, int) and s > 0]
    return (fixed[0], True) if fixed else (None, False)


