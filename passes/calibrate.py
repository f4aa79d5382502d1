"""calibrate: stream calibration batches through onnxruntime and observe ranges.

One session over the model exposes exactly the tensors later passes asked ranges
for; each batch updates a fixed-size histogram per tensor and is then dropped, so
memory does not grow with the number of samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.analyses import RangeMethod
from qcompile.calib_data import model_input_specs, open_dataset
from qcompile.config import at_least
from qcompile.facts import Fact
from qcompile.observers import HistogramObserver
from qcompile.registry import QPass, register_pass

from .activation_stream import streamed_samples
from .stream_workers import collect_groups


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
            return at_least(self, samples=1, batch_size=1, bins=128)

    GIVES = frozenset({Fact.RANGES})

    def run(self, model: ir.Model) -> bool:
        """Observes; the graph is not changed (modified: False)."""
        cfg, ctx = self.config, self.ctx
        ctx.stats.method = RangeMethod(cfg.method, cfg.percentile)
        request = ctx.range_request
        values = _values_by_name(model)
        wanted = [values[n] for n in sorted(request.tensors) if n in values and n not in ctx.stats]
        if not wanted:
            note = "no pass asked for ranges" if not request.tensors else \
                "every requested range came from an earlier compile of the same model and data"
            ctx.reports["calibrate"] = {"tensors": 0, "samples": 0, "reused": len(request.tensors), "note": note}
            return False
        dataset = ctx.data
        if dataset is None:
            dataset = open_dataset(None, model_input_specs(model), synthetic_samples=cfg.synthetic_samples)
            ctx.warn(f"no calibration data: calibrating on {cfg.synthetic_samples} synthetic samples. "
                     "Activation ranges from random inputs rarely match real data; expect a large "
                     "accuracy loss. Pass --calib data.npz for a real compile.")
        names = [v.name for v in wanted]
        collector = functools.partial(ObserverCollector, names, cfg.bins, dict(request.channel_axes))
        observers = {n: HistogramObserver(cfg.bins) for n in names}    # a tensor never streamed stays empty
        for found in collect_groups(model, wanted, dataset, collector, samples=cfg.samples, label="calibrate",
                                    progress=ctx.progress, batch_size=cfg.batch_size, memory=ctx.memory,
                                    sharding=ctx.sharding):
            observers.update(found)
        seen = streamed_samples(model, dataset, samples=cfg.samples)
        ctx.stats.add(observers)
        nonfinite = sorted(n for n, o in observers.items() if o.nonfinite)
        if nonfinite:
            ctx.warn(f"{len(nonfinite)} tensors held Inf/NaN during calibration (e.g. {nonfinite[0]}); "
                     "those values are left out of their ranges")
        ctx.reports["calibrate"] = {"tensors": len(names), "samples": seen, "method": cfg.method,
                                   "data": dataset.description}
        return False


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            values[out.name] = out
    return values


class ObserverCollector:
    """A histogram observer per tensor (and per-channel sums where a later pass asked for
    them); partials merge observer by observer (compiler/observers.py)."""

    def __init__(self, names: list[str], bins: int, channel_axes: dict[str, int]):
        self.observers = {n: HistogramObserver(bins) for n in names}
        self.channel_axes = channel_axes

    def update(self, name: str, array: np.ndarray, batch: int) -> None:
        self.observers[name].update(array)
        if name in self.channel_axes:
            self.observers[name].update_channels(array, self.channel_axes[name])

    def take(self, names: set[str]) -> dict[str, HistogramObserver]:
        return {n: self.observers.pop(n) for n in names if n in self.observers}

    @staticmethod
    def merge(parts: list[dict]) -> dict[str, HistogramObserver]:
        merged = dict(parts[0])
        for part in parts[1:]:
            for name, observer in part.items():
                if name in merged:
                    merged[name].merge(observer)
                else:
                    merged[name] = observer
        return merged
