"""What the passes of one compile share: the target, the calibration data, and one object
per hand-off (analyses.py), the layer table (layers.py), each pass's report section,
warnings, and what a target emits beside the model.

Every member is named for what it holds and typed; a pass reads the analyses it needs and
writes the ones it makes, and nothing else travels between passes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from .analyses import ActivationStats, PrecomputedWeights, RangeRequest, Rescales, SparseWeights
from .calib_data import Dataset
from .layers import LayerTable
from .memory_plan import MemoryPlan
from .sharding import Sharding
from .targets import Target

log = logging.getLogger("qcompile")


class Warnings:
    """Warnings for the user: each logged once and listed in the report."""

    def __init__(self):
        self._messages: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self._messages:
            self._messages.append(message)
            log.warning(message)

    def __iter__(self):
        return iter(list(self._messages))

    def to_json(self) -> list[str]:
        return list(self._messages)


@dataclasses.dataclass
class CompanionModel:
    """A second graph a lowering ships beside model.onnx (e.g. model.kernels.onnx: the same model
    with generated-kernel nodes), verified against the original like model.onnx."""
    model: ir.Model
    # an onnxruntime custom-op library that runs its custom nodes in verification (their
    # reference: the CPU family's kernels for the same ops); None: it cannot be verified here
    reference_library: Path | None
    what: str                     # what verification runs, for the report


@dataclasses.dataclass
class TargetOutputs:
    """What a target's lowering emits beside model.onnx."""
    # extra files (name -> writer(path)), e.g. atc.sh
    artifacts: dict[str, Callable[[Path], None]] = dataclasses.field(default_factory=dict)
    # an onnxruntime-runnable equivalent of the shipped graph, when onnxruntime cannot run the
    # shipped graph itself (custom target ops): verification runs this instead
    reference_model: ir.Model | None = None
    # further graphs to write beside model.onnx and verify (file name -> CompanionModel)
    companions: dict[str, CompanionModel] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    target: Target
    data: Dataset | None = None               # calibration data (--calib); None: data-free
    progress: bool = True
    stats: ActivationStats = dataclasses.field(default_factory=ActivationStats)
    range_request: RangeRequest = RangeRequest()      # set by the pipeline before a pass giving ranges
    weights: PrecomputedWeights = dataclasses.field(default_factory=PrecomputedWeights)
    rescales: Rescales = dataclasses.field(default_factory=Rescales)
    sparse: SparseWeights = dataclasses.field(default_factory=SparseWeights)
    layers: LayerTable = dataclasses.field(default_factory=LayerTable)
    reports: dict[str, Any] = dataclasses.field(default_factory=dict)   # pass name -> its report section
    warnings: Warnings = dataclasses.field(default_factory=Warnings)
    outputs: TargetOutputs = dataclasses.field(default_factory=TargetOutputs)
    memory: MemoryPlan | None = None          # --max-memory: activations streamed block by block
    sharding: Sharding = Sharding()           # --workers / --ray: calibration statistics across processes

    def warn(self, message: str) -> None:
        self.warnings.warn(message)
