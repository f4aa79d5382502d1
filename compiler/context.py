"""State shared by the passes of one compile: target, data, statistics, report."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from .calib_data import Dataset
from .observers import HistogramObserver
from .targets import Target

log = logging.getLogger("qcompile")


@dataclasses.dataclass
class CompileContext:
    target: Target
    calib: Dataset | None = None
    progress: bool = True
    # tensor name -> observer, filled by `calibrate`
    stats: dict[str, HistogramObserver] = dataclasses.field(default_factory=dict)
    # the calibrate pass's config (range method and its parameters)
    calibration: Any = None
    # tensors later passes want ranges for (asked before `calibrate` runs)
    range_requests: set[str] = dataclasses.field(default_factory=set)
    # tensor -> channel axis whose per-channel mean a later pass wants (bias correction)
    channel_axes: dict[str, int] = dataclasses.field(default_factory=dict)
    # report sections, one per pass, plus warnings
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # weight name -> integers and scales chosen by a weight algorithm (gptq), used by quantize
    precomputed_weights: dict[str, Any] = dataclasses.field(default_factory=dict)
    # tensor -> (channel axis, s): a float-exact equalization divided this tensor by s per channel
    # (smooth_quant, awq, equalize_outputs); verify's per-layer table multiplies it back
    rescaled: dict[str, tuple[int, Any]] = dataclasses.field(default_factory=dict)
    # per-layer decisions: node name -> record (op, status, scheme, reason)
    layers: dict[str, dict] = dataclasses.field(default_factory=dict)
    # extra files a target emits beside model.onnx (name -> writer(path)), e.g. atc.sh
    artifacts: dict[str, Callable[[Path], None]] = dataclasses.field(default_factory=dict)
    # an onnxruntime-runnable equivalent of the shipped graph, when onnxruntime cannot run
    # the shipped graph itself (custom target ops): verification runs this instead
    reference_model: ir.Model | None = None

    def note_rescaled(self, tensor: str, axis: int, s) -> None:
        """Record that `tensor` is now the original divided by s along `axis` (factors compose)."""
        old = self.rescaled.get(tensor)
        self.rescaled[tensor] = (axis, s if old is None else old[1] * s)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning(message)
