"""The typed analyses passes hand each other, one class per hand-off.

* `ActivationStats` (calibrate -> quantize, quantize_attention, verify's fallback ranking):
  one streaming observer per tensor of the float model, and the range method calibrate was
  configured with, so a reader asks `stats.range(tensor, dtype=..., symmetric=...)` and
  never needs calibrate's config;
* `RangeRequest` (later passes -> calibrate): which tensors need ranges and which of them
  also per-channel statistics; the pipeline asks every later pass for one before a pass
  that gives `ranges` runs;
* `PrecomputedWeights` (gptq -> quantize): integers and scales a weight algorithm chose;
* `Rescales` (smooth_quant, awq, equalize_outputs -> verify): tensors a float-exact
  equalization divided per channel, so verify's per-layer table can multiply them back;
* `SparseWeights` (sparsify -> a target's lowering): which weights were pruned to which
  pattern, so a target that compresses a pattern (ATC's 2:4 `--sparsity=1`) can ask for it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from .observers import HistogramObserver
from .schemes import WeightScheme
from .weight_store import stored_tensor


@dataclasses.dataclass(frozen=True)
class RangeMethod:
    """How a calibrated range is read off a histogram (calibrate's `method`, `percentile`)."""
    method: str = "minmax"
    percentile: float = 99.999


class ActivationStats:
    """Observers by tensor name, plus the range method of the compile reading them."""

    def __init__(self, observers: "dict[str, HistogramObserver] | ActivationStats | None" = None):
        if isinstance(observers, ActivationStats):  # an earlier compile's, as CompileResult.stats holds them
            observers = observers.observers()
        self._observers: dict[str, HistogramObserver] = dict(observers or {})
        self.method: RangeMethod | None = None   # set by calibrate

    def __contains__(self, tensor: str) -> bool:
        return tensor in self._observers

    def __len__(self) -> int:
        return len(self._observers)

    def get(self, tensor: str) -> HistogramObserver | None:
        return self._observers.get(tensor)

    def add(self, observers: dict[str, HistogramObserver]) -> None:
        self._observers.update(observers)

    def observers(self) -> dict[str, HistogramObserver]:
        """Every observer (for reuse by a later compile of the same model and data)."""
        return dict(self._observers)

    def range(self, tensor: str, *, dtype: str, symmetric: bool) -> tuple[float, float] | None:
        """The calibrated (lo, hi) of `tensor` for a `dtype` grid, or None when it was not observed."""
        obs = self._observers.get(tensor)
        if obs is None or obs.count == 0:
            return None
        method = self.method or RangeMethod()
        return obs.range(method.method, percentile=method.percentile, dtype=dtype, symmetric=symmetric)


@dataclasses.dataclass(frozen=True)
class RangeRequest:
    """Tensors whose ranges later passes want; `channel_axes`: those that also want per-channel
    sums and maxima along that axis (bias correction's E[x], attention's per-head scales)."""
    tensors: frozenset[str] = frozenset()
    channel_axes: dict[str, int] = dataclasses.field(default_factory=dict)

    def __or__(self, other: "RangeRequest") -> "RangeRequest":
        return RangeRequest(self.tensors | other.tensors, {**self.channel_axes, **other.channel_axes})

    def __bool__(self) -> bool:
        return bool(self.tensors)


@dataclasses.dataclass(frozen=True)
class PrecomputedWeight:
    """Integers and scales a weight algorithm chose, in the layout quantize writes."""
    scheme: WeightScheme
    granularity: str
    axis: int | None
    block: int | None
    q: np.ndarray        # [K, N] (MatMul layout) or the Conv's [Cout, Cin/g, kh, kw], weight dtype's values
    scale: np.ndarray    # [N] per channel, or [ceil(K/g), N] per group
    zero_point: np.ndarray


class PrecomputedWeights:
    """Weight initializer name -> the PrecomputedWeight chosen for it. Under --max-memory the
    integers wait in the weight spill file (compiler/weight_store.py) until quantize reads them."""

    def __init__(self):
        self._by_weight: dict[str, tuple[PrecomputedWeight, object]] = {}

    def put(self, weight: str, chosen: PrecomputedWeight) -> None:
        self._by_weight[weight] = (dataclasses.replace(chosen, q=None), stored_tensor(chosen.q, f"{weight}_q"))

    def get(self, weight: str) -> PrecomputedWeight | None:
        if weight not in self._by_weight:
            return None
        chosen, q = self._by_weight[weight]
        return dataclasses.replace(chosen, q=q.numpy())


class Rescales:
    """Tensor -> (channel axis, s): the tensor is now the original divided by s along that axis."""

    def __init__(self):
        self._by_tensor: dict[str, tuple[int, np.ndarray]] = {}

    def note(self, tensor: str, axis: int, s) -> None:
        """Record a division by s (factors on the same tensor compose)."""
        old = self._by_tensor.get(tensor)
        self._by_tensor[tensor] = (axis, s if old is None else old[1] * s)

    def get(self, tensor: str) -> tuple[int, np.ndarray] | None:
        return self._by_tensor.get(tensor)

    def undo(self, tensor: str, x: np.ndarray) -> np.ndarray:
        """`x` (a value of `tensor` in the rescaled graph) in the original's units."""
        found = self._by_tensor.get(tensor)
        if found is None:
            return x
        axis, s = found
        shape = [1] * x.ndim
        shape[axis] = -1
        return x * np.asarray(s, dtype=np.float32).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_tensor)


class SparseWeights:
    """Weight initializer name -> the sparsity pattern it was pruned to ("2:4", "unstructured")."""

    def __init__(self):
        self._by_weight: dict[str, str] = {}

    def put(self, weight: str, pattern: str) -> None:
        self._by_weight[weight] = pattern

    def patterns(self) -> set[str]:
        return set(self._by_weight.values())

    def __len__(self) -> int:
        return len(self._by_weight)
