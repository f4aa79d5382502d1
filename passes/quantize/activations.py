"""Static activations: their dtype, their Q/DQ parameters from the calibrated ranges, the range
guard that keeps a layer float where one per-tensor scale cannot serve its input, and the
range-ranked fallback."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.analyses import ActivationStats
from qcompile.numerics import compute_qparams, is_float8, to_storage
from qcompile.qdq import insert_qdq
from qcompile.schemes import ActivationScheme

from .config import RangeGuard
from .plan import LayerPlan, activation_symmetric, concat_parts
from .shifts import apply_shift, shift_params, shiftable

# entropy/MSE ranges search an integer grid; FP8 activations use int8's as their proxy
_GRID_FOR_RANGE = {"float8e4m3fn": "int8", "float8e5m2": "int8", "int4": "int4", "uint4": "uint4"}


def activation_dtype(act: ActivationScheme, target) -> str:
    """The scheme's dtype; `auto` is int8 for dynamic activations, else the target's choice."""
    if act.dtype == "auto":
        return "int8" if act.is_dynamic else target.setting("activation_dtype", "uint8")
    return act.dtype


def activation_params(stats: ActivationStats, value: ir.Value, act: ActivationScheme, dtype: str, target):
    """(scale, zero point) for `value` from its calibrated range, or why there is none."""
    symmetric = activation_symmetric(act, target) or is_float8(dtype)
    found = stats.range(value.name, dtype=_GRID_FOR_RANGE.get(dtype, dtype), symmetric=symmetric)
    if found is None:
        return f"no calibration range for tensor {value.name!r}"
    return compute_qparams(*found, dtype, symmetric=symmetric)


def range_guard(stats: ActivationStats, plan: LayerPlan, guard: RangeGuard) -> str | None:
    """Why one per-tensor scale cannot serve this layer's input (None: it can)."""
    for v in plan.activations:
        obs = stats.get(v.name)
        if obs is None:
            continue
        if guard.max_abs and (obs.nonfinite or max(abs(obs.min), abs(obs.max)) > guard.max_abs):
            what = f"{obs.nonfinite} Inf/NaN values" if obs.nonfinite else \
                f"values up to {max(abs(obs.min), abs(obs.max)):.3g}"
            return (f"range_guard: input {v.name!r} holds {what} (beyond max_abs {guard.max_abs:g}); "
                    "one int8 scale would flatten everything else")
        parts = [(part.name, stats.get(part.name)) for part in concat_parts(v)]
        spans = {n: max(abs(s.min), abs(s.max)) for n, s in parts if s is not None and s.count}
        if guard.concat_ratio and len(spans) > 1 and min(spans.values()) > 0:
            ratio = max(spans.values()) / min(spans.values())
            if ratio > guard.concat_ratio:
                lo, hi = min(spans, key=spans.get), max(spans, key=spans.get)
                return (f"range_guard: input {v.name!r} concatenates {hi!r} (|x| up to {spans[hi]:.3g}) with "
                        f"{lo!r} (up to {spans[lo]:.3g}), {ratio:.0f}x apart; one scale would erase the smaller")
    return None


def fall_back_by_range(stats: ActivationStats, plans: list[LayerPlan], skipped: dict, count: int) -> list[LayerPlan]:
    """Keep the `count` layers whose inputs have the highest max|x|/std in float."""
    def measure(p: LayerPlan) -> float:
        observed = [stats.get(v.name) for v in p.activations]
        return max((s.range_measure() for s in observed if s is not None), default=0.0)

    ranked = sorted(plans, key=measure, reverse=True)
    dropped = {id(p) for p in ranked[:count]}
    for p in ranked[:count]:
        skipped[p.node.name] = (f"fallback: input range measure max|x|/std = {measure(p):.1f}, "
                                f"among the {count} highest")
    return [p for p in plans if id(p) not in dropped]


class StaticActivations:
    """One Q/DQ pair per quantized tensor, shared by the layers that read it: parameters are
    chosen once per tensor (first layer wins) and the pairs inserted after every layer is rewritten."""

    def __init__(self, stats: ActivationStats, target):
        self.stats, self.target = stats, target
        self.params: dict[str, tuple] = {}          # tensor -> (scale, zero point, dtype)
        self._values: dict[str, ir.Value] = {}
        self._consumers: dict[str, set | None] = {}  # None: every consumer (a layer output)

    def prepare(self, plan: LayerPlan) -> str | None:
        """Parameters for the plan's input and output tensors; why not, when one has no range."""
        dtype = activation_dtype(plan.scheme.activation, self.target)
        problems = []
        for v in (*plan.activations, plan.output):
            if v is not None and v.name not in self.params:
                params = activation_params(self.stats, v, plan.scheme.activation, dtype, self.target)
                if isinstance(params, str):
                    problems.append(params)
                else:
                    self.params[v.name] = (*params, dtype)
        return problems[0] if problems else None

    def dtype_of(self, plan: LayerPlan) -> str:
        return self.params[plan.activations[0].name][2]

    def scale_of(self, value: ir.Value) -> np.ndarray:
        return self.params[value.name][0]

    def route(self, plan: LayerPlan) -> None:
        """Remember which consumers of the plan's tensors read them quantized."""
        for v in plan.activations:
            self._values.setdefault(v.name, v)
            if self._consumers.get(v.name, set()) is not None:
                self._consumers.setdefault(v.name, set()).add(plan.node)
        if plan.output is not None:
            out = plan.node.outputs[0] if plan.folded is not None else plan.output
            self._values.setdefault(plan.output.name, out)
            self._consumers[plan.output.name] = None

    def join_region(self, members: list[ir.Node], act: ActivationScheme) -> list[str]:
        """Quantize each int8-region member's output in the dtype of its inputs, and route its
        inputs' Q/DQ to it; the names of members whose output has no calibrated range (those
        must be left out, and the region re-closed, before calling again)."""
        new, missing = {}, []
        for node in members:            # in graph order: an input from a member already has its dtype
            out = node.outputs[0]
            if out.name in self.params:
                continue
            first = node.inputs[0].name
            dtype = (self.params.get(first) or new.get(first) or (None, None, "uint8"))[2]
            params = activation_params(self.stats, out, act, dtype, self.target)
            if isinstance(params, str):
                missing.append(node.name)
            else:
                new[out.name] = (*params, dtype)
        if missing:
            return missing
        self.params.update(new)
        for node in members:
            out = node.outputs[0]
            self._values.setdefault(out.name, out)
            self._consumers[out.name] = None
            for v in node.inputs:
                self._values.setdefault(v.name, v)
                if self._consumers.get(v.name, set()) is not None:
                    self._consumers.setdefault(v.name, set()).add(node)
        return []

    def join_skips(self, skips: list[tuple[ir.Node, ir.Value]], act: ActivationScheme) -> int:
        """Quantize each residual Add's skip input for that Add (residuals.py): with the tensor's
        own parameters, or the pair it already has as a layer input; returns how many (a skip
        with no calibrated range stays float)."""
        joined, dtype = 0, activation_dtype(act, self.target)
        for add, skip in skips:
            if skip.name not in self.params:
                params = activation_params(self.stats, skip, act, dtype, self.target)
                if isinstance(params, str):
                    continue
                self.params[skip.name] = (*params, dtype)
            self._values.setdefault(skip.name, skip)
            if self._consumers.get(skip.name, set()) is not None:
                self._consumers.setdefault(skip.name, set()).add(add)
            joined += 1
        return joined

    def shift_one_sided(self, graph: ir.Graph) -> list[str]:
        """Symmetric int8 tensors whose range is one-sided, read only by MatMuls: quantized as
        with a zero point through a shift (shifts.py); the names of those shifted."""
        done = []
        for name in list(self._values):
            scale, zp, dtype = self.params[name]
            value = self._values[name]
            readers = shiftable(value, self._consumers.get(name)) if dtype == "int8" and not np.any(zp) else None
            found = self.stats.range(name, dtype="int8", symmetric=False) if readers else None
            params = shift_params(*found, float(np.asarray(scale).reshape(()))) if found else None
            if params is None:
                continue
            s, shift = params
            shifted = apply_shift(graph, value, shift, readers)
            del self._values[name]
            consumers = self._consumers.pop(name)
            self._values[shifted.name] = shifted
            self._consumers[shifted.name] = consumers
            self.params[shifted.name] = (np.float32(s), np.zeros((), np.int8), dtype)
            done.append(name)
        return done

    def insert(self, graph: ir.Graph, through_graph_output: set[str]) -> int:
        """Insert the Q/DQ pairs; `through_graph_output`: tensors whose graph output is routed too."""
        for name, value in self._values.items():
            scale, zp, dtype = self.params[name]
            insert_qdq(graph, value, scale, to_storage(np.asarray(zp), dtype),
                       through_graph_output=value.name in through_graph_output,
                       consumers=self._consumers.get(name))
        return len(self._values)
