"""quantize_attention: int8 Q, K and V on fused attention (FlashAttention-3 style), per head.

FA3 runs attention's two matrix products in int8 with one symmetric scale per head for Q,
K and V. Here that is QDQ on the fused operator's query/key/value inputs (after `fuse`):
symmetric int8, zero point 0, scale = max|x| of the head over the calibration data / 127.
A 3-D input [batch, seq, heads*head_dim] is viewed as [batch, seq, heads, head_dim] (Reshape)
and gets a per-axis scale on the head axis; a 4-D [batch, heads, seq, head_dim] one a per-axis
scale on axis 1.

On `cpu` onnxruntime's MultiHeadAttention/GroupQueryAttention kernels take float inputs,
so this QDQ form runs DequantizeLinear in front of them; the cpu target's `generate_kernels`
lowering then replaces it with a generated int8 attention (backends/cpu/int8_attention.py),
and only where no kernel can be built does the float form (FA3 numerics, not speed) ship. The
softmax output, FA3's optional third quantized tensor, is inside the fused operator and
is not quantized here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.analyses import RangeRequest
from qcompile.facts import Fact
from qcompile.layers import LayerRecord, LayerStatus
from qcompile.qdq import add_initializer, insert_qdq
from qcompile.registry import QPass, register_pass

from .rules.fusions import ATTENTION_OPS

_INPUTS = ("query", "key", "value")
_QMAX = 127.0


def attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in ATTENTION_OPS and n.domain == "com.microsoft"]


def _input(node: ir.Node, which: str) -> ir.Value | None:
    index = ATTENTION_OPS[node.op_type][_INPUTS.index(which)]
    return node.inputs[index] if index < len(node.inputs) else None


def _heads(node: ir.Node, which: str) -> int:
    if node.op_type == "GroupQueryAttention" and which != "query":
        return node.attributes.get_int("kv_num_heads", 0)
    return node.attributes.get_int("num_heads", 0)


def _channel_axis(value: ir.Value) -> int | None:
    """The axis whose per-channel max|x| gives per-head scales: 1 for BNSH, last for BSD."""
    rank = value.shape.rank() if value.shape is not None else None
    return {3: 2, 4: 1}.get(rank)


@register_pass("quantize_attention")
class QuantizeAttention(QPass):
    """Symmetric int8 Q/K/V (per head or per tensor) on the inputs of fused attention operators."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        dtype: Literal["int8"] = "int8"
        granularity: Literal["per_head", "per_tensor"] = "per_head"
        inputs: tuple[Literal["query", "key", "value"], ...] = _INPUTS

        def validate(self):
            if not self.inputs:
                return "inputs", "name at least one of query, key, value"
            return None

    NEEDS = frozenset({Fact.FUSED, Fact.RANGES})

    @classmethod
    def check_target(cls, config, target) -> str | None:
        """FA3 quantizes a fused attention operator's inputs; a target that fuses no attention
        would get a recipe that silently does nothing."""
        fusions = set(target.setting("fusions") or ())
        if not fusions & {"attention", "attention_gqa"}:
            return (f"FA3 Q/K/V quantization needs a fused attention operator, and target {target.name} runs "
                    f"no attention fusion (its descriptor's `fusions`: {sorted(fusions) or 'none'}); on Ascend "
                    "the fused attention arrives with kernel generation. Use w8a8-smooth (attention MatMuls "
                    "stay as they are) or compile for cpu")
        return None

    GIVES = frozenset({Fact.QDQ})

    @classmethod
    def wants_ranges(cls, model: ir.Model, config, target) -> RangeRequest:
        """Each fused attention's Q/K/V inputs, with per-channel maxima for per-head scales."""
        axes = {}
        for node in attention_nodes(model):
            for which in config.inputs:
                value = _input(node, which)
                if value is not None and _channel_axis(value) is not None:
                    axes[value.name] = _channel_axis(value)
        return RangeRequest(frozenset(axes), axes)

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        nodes = attention_nodes(model)
        report = {"nodes": {}, "skipped": {}}
        self.ctx.reports["quantize_attention"] = report
        if not nodes:
            self.ctx.warn("quantize_attention: the graph has no fused attention operator (did `fuse` leave "
                          "attention unfused? see report.json fuse.unfused_attention)")
            return False
        for node in nodes:
            entry = {}
            for which in self.config.inputs:
                value = _input(node, which)
                if value is None:
                    continue
                scale, why = self._scale(node, which, value)
                if scale is None:
                    report["skipped"][f"{node.name}.{which}"] = why
                    continue
                self._insert(graph, node, which, value, scale)
                entry[which] = [float(v) for v in scale]
            if entry:
                report["nodes"][node.name] = entry
                self.ctx.layers.set(LayerRecord(
                    node.name, node.op_type, LayerStatus.QUANTIZED,
                    label=f"FA3 int8 {self.config.granularity} {'/'.join(entry)}",
                    activation_label=f"int8 symmetric {self.config.granularity}",
                    notes=["the attention kernel on cpu takes float inputs: DequantizeLinear runs in front "
                           "of it (FA3 numerics, not FA3 speed)"]))
        graph.sort()
        return bool(report["nodes"])

    def _scale(self, node: ir.Node, which: str, value: ir.Value) -> tuple[np.ndarray | None, str]:
        """One scale (per_tensor) or one per head, from the calibrated per-channel max|x|."""
        stats = self.ctx.stats.get(value.name)
        if stats is None or stats.channel_absmax is None:
            return None, "no calibration statistics for this input"
        absmax = stats.channel_absmax
        if self.config.granularity == "per_tensor":
            return np.asarray([max(float(absmax.max()), 1e-12) / _QMAX], np.float32), ""
        heads = _heads(node, which)
        if value.shape.rank() == 4:  # BNSH: channels are heads already
            per_head = absmax
        else:
            if not heads or absmax.size % heads:
                return None, f"{absmax.size} channels do not split into {heads} heads"
            per_head = absmax.reshape(heads, -1).max(axis=1)
        return (np.maximum(per_head, 1e-12) / _QMAX).astype(np.float32), ""

    @staticmethod
    def _insert(graph: ir.Graph, node: ir.Node, which: str, value: ir.Value, scale: np.ndarray) -> None:
        """Q/DQ in front of `node`. A per-head scale on a [batch, seq, heads*head_dim] input goes
        on a [batch, seq, heads, head_dim] view (Reshape, Q/DQ on axis 2, Reshape back):
        onnxruntime's per-axis QuantizeLinear along a 384-wide last axis took 571 us per
        MiniLM attention input, against 25 us on the head axis of the view."""
        zero = np.zeros(scale.shape, np.int8)
        if scale.size == 1:
            insert_qdq(graph, value, float(scale[0]), np.zeros((), np.int8), consumers={node})
        elif value.shape.rank() == 4:
            insert_qdq(graph, value, scale, zero, consumers={node}, axis=1)
        else:
            heads_view = add_initializer(graph, f"{value.name}_heads_shape", np.asarray([0, 0, scale.size, -1], np.int64))
            flat = add_initializer(graph, f"{value.name}_flat_shape", np.asarray([0, 0, -1], np.int64))
            split = ir.node("Reshape", [value, heads_view], name=f"{node.name}_{which}_heads")
            dims = list(value.shape)
            split.outputs[0].name, split.outputs[0].dtype = f"{value.name}_heads", value.dtype
            split.outputs[0].shape = ir.Shape(dims[:2] + [scale.size, dims[2] // scale.size
                                                          if isinstance(dims[2], int) else None])
            merge = ir.node("Reshape", [split.outputs[0], flat], name=f"{node.name}_{which}_merge")
            merge.outputs[0].name, merge.outputs[0].dtype = f"{value.name}_merged", value.dtype
            merge.outputs[0].shape = value.shape
            graph.extend([split, merge])
            node.replace_input_with(ATTENTION_OPS[node.op_type][_INPUTS.index(which)], merge.outputs[0])
            insert_qdq(graph, split.outputs[0], scale, zero, consumers={merge}, axis=2)
