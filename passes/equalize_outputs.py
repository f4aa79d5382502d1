"""equalize_outputs: bring a Conv's output channels to one range before that output is quantized,
with the per-channel factor folded into whatever reads it.

With static activations a Conv's output is quantized per tensor (onnxruntime's int8 Conv
writes int8). Where its channels' ranges differ widely the narrow channels get few levels:
on PP-OCRv4 det these outputs, not the Conv inputs, hold most of the W8A8 error (with them
left float the probability map goes from 16.3 to 21.3 dB). Dividing output channel c by s_c
(its weight row and bias) costs nothing under per-channel weights — the weight scale takes
s_c, and the int32 bias scale x_scale·w_scale_c with it — and the reader undoes it:

* `mul`: a Mul by a constant of one value or one per channel (PP-LCNet's learnable affine
  after each Conv): that constant × s;
* `conv`: a Conv reading the output directly and alone: its input-channel weights × s (a
  depthwise reader's per-channel weight scales absorb it exactly).

s_c = (r_c / r_max)^strength, r_c = max|y_c| over the calibration data: strength 1 gives every
channel the widest channel's range. The float model is unchanged. Run it before `calibrate`
(and before `gptq`, which then rounds the equalized weights).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.config import at_least
from qcompile.errors import DataError
from qcompile.facts import FLOAT_MODEL_CHANGED, Fact
from qcompile.qdq import set_constant_input
from qcompile.registry import QPass, register_pass

from .conv_patches import ConvGeometry
from .equalization.channels import channel_shaped, per_channel_shape, times_channels
from .equalization.conv_channels import divide_output_channels, multiply_input_channels
from .equalization.stats import channel_stats
from .scope import in_scope

_DEAD = 1e-3   # channels whose range is below this fraction of the widest are left as they are


@dataclasses.dataclass
class Candidate:
    conv: ir.Node
    reader: ir.Node
    kind: str                   # mul | conv
    const_index: int = 1        # mul: which input of the Mul is the constant


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


@register_pass("equalize_outputs")
class EqualizeOutputs(QPass):
    """Per-channel range equalization of quantized Conv outputs, folded into their reader (float-exact)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        strength: float = 1.0
        readers: tuple[Literal["mul", "conv"], ...] = ("mul", "conv")
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        samples: int = 32

        def validate(self):
            if not 0.0 < self.strength <= 1.0:
                return "strength", f"must be in (0, 1], got {self.strength}"
            return at_least(self, samples=1)

    GIVES = frozenset({Fact.EQUALIZED})
    INVALIDATES = FLOAT_MODEL_CHANGED

    @classmethod
    def candidates(cls, model: ir.Model, config) -> tuple[list[Candidate], dict[str, str]]:
        found, skipped = [], {}
        outputs = set(model.graph.outputs)
        for node in model.graph:
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or _const(node.inputs[1]) is None:
                continue
            if not in_scope(node.name, config):
                continue
            y = node.outputs[0]
            uses = y.uses()
            if y in outputs or len(uses) != 1:
                skipped[node.name] = "its output is a graph output or has several readers"
                continue
            reader = uses[0].node
            why = _reader_problem(reader, uses[0].idx, y, config.readers)
            if why:
                skipped[node.name] = why
                continue
            kind = "mul" if reader.op_type == "Mul" else "conv"
            found.append(Candidate(node, reader, kind, 1 - uses[0].idx if kind == "mul" else 1))
        return found, skipped

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        found, skipped = self.candidates(model, cfg)
        records = {name: {"status": "skipped", "reason": why} for name, why in skipped.items()}
        if not found:
            ctx.reports["equalize_outputs"] = {"equalized": 0, "convs": records}
            return False
        amax = self._output_absmax(model, found)
        for cand in found:
            r = amax[cand.conv.name]
            top = float(r.max())
            if top <= 0:
                records[cand.conv.name] = {"status": "skipped", "reason": "its output is all zero on the calibration data"}
                continue
            live = r >= _DEAD * top    # dead channels (PP-OCR det has some) keep s = 1: scaling them up
            s = np.where(live, np.power(np.maximum(r / top, _DEAD), cfg.strength), 1.0)   # only inflates the bias
            self._fold(model.graph, cand, s)
            ctx.rescales.note(cand.conv.outputs[0].name, 1, s)
            after = r[live] / s[live]
            records[cand.conv.name] = {"status": "equalized", "reader": f"{cand.kind} {cand.reader.name}",
                                       "range_ratio_before": round(float(top / r[live].min()), 2),
                                       "range_ratio_after": round(float(after.max() / after.min()), 2),
                                       "dead_channels": int((~live).sum())}
        done = sum(1 for rec in records.values() if rec["status"] == "equalized")
        ctx.reports["equalize_outputs"] = {"equalized": done, "strength": cfg.strength, "convs": records}
        return bool(done)

    def _output_absmax(self, model: ir.Model, found: list[Candidate]) -> dict[str, np.ndarray]:
        """max |y_c| per output channel of each candidate Conv over the calibration data."""
        if self.ctx.data is None:
            raise DataError("equalize_outputs needs calibration data (--calib): the ranges it equalizes are measured")
        ranges, _ = channel_stats(model, [c.conv.outputs[0] for c in found], self.ctx, samples=self.config.samples,
                                  rows=0, label="equalize_outputs", channel_axis=1)
        return {c.conv.name: np.maximum(-ranges[c.conv.outputs[0].name][0], ranges[c.conv.outputs[0].name][1])
                for c in found}

    @staticmethod
    def _fold(graph: ir.Graph, cand: Candidate, s: np.ndarray) -> None:
        """y_c / s_c in the Conv (weight row, bias), × s_c in the reader."""
        conv = cand.conv
        divide_output_channels(graph, conv, s)
        if cand.kind == "mul":
            rank = len(conv.outputs[0].shape) if conv.outputs[0].shape is not None else len(conv.inputs[1].shape)
            c = _const(cand.reader.inputs[cand.const_index])
            set_constant_input(graph, cand.reader, cand.const_index, times_channels(c, channel_shaped(s, rank, 1), rank))
        else:
            multiply_input_channels(graph, cand.reader, s)


def _reader_problem(reader: ir.Node, idx: int, y: ir.Value, allowed) -> str:
    """Why `reader` cannot undo a per-channel factor on y ('' when it can)."""
    if reader.op_type == "Mul" and "mul" in allowed:
        other = _const(reader.inputs[1 - idx])
        rank = len(y.shape) if y.shape is not None else None
        if other is None:
            return "read by a Mul of two activations"
        if rank is None or not per_channel_shape(other, rank, 1):
            return "read by a Mul whose constant is neither one value nor one per channel"
        return ""
    if reader.op_type == "Conv" and "conv" in allowed and idx == 0:
        w2 = _const(reader.inputs[1])
        if w2 is None or ConvGeometry.of(reader, w2.shape) is None:
            return "read by a Conv without a constant 2-D weight"
        return ""
    return f"read by {reader.op_type}, which cannot undo a per-channel factor"
