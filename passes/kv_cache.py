"""kv_cache: an int8 KV cache for decoder graphs with past/present key-value tensors.

The cache a runtime keeps between decoding steps is the model's `present.*` outputs fed
back as `past_key_values.*` inputs. This pass makes both int8: each present K/V is
quantized on its way out (symmetric, scale from calibration, per head or per head and
channel), each past K/V is dequantized on entry, and the attention inside the step reads
the dequantized present too, so the step computes with exactly what the cache will hold.
The cache is then a quarter of its float32 bytes, half of fp16's.

The graph's inputs and outputs change type, so the scales travel with the model: the
metadata key `qcompile.io_quantization` (JSON: tensor name -> scale, its broadcast shape
and dtype) tells a runtime, and `qcompile verify`, how to encode past and decode present.

per_head: one scale per KV head (QuantizeLinear/DequantizeLinear on axis 1).
per_channel: one per head and head-dim channel, KIVI's choice for keys whose outliers sit
in fixed channels; written as Div/Mul by a [1, heads, 1, head_dim] scale around a unit-scale
QuantizeLinear/DequantizeLinear (ONNX Q/DQ scales follow one axis only).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.config import at_least
from qcompile.errors import DataError, RecipeError
from qcompile.qdq import add_initializer
from qcompile.registry import QPass, register_pass

from .activation_stream import stream_tensors

METADATA_KEY = "qcompile.io_quantization"
_QMAX = 127.0
# present.{i}.key <-> past_key_values.{i}.key (Hugging Face / optimum), past.{i}.key, past_key.{i}
_PAST_SPELLINGS = (r"^present", "past_key_values"), (r"^present", "past"), (r"^present_", "past_")


def kv_pairs(model: ir.Model) -> list[tuple[ir.Value, ir.Value]]:
    """(past input, present output) pairs, matched by name; a present without its past is an error."""
    inputs = {v.name: v for v in model.graph.inputs}
    presents = [o for o in model.graph.outputs if o.name.startswith("present")]
    pasts = [v for v in model.graph.inputs if v.name.startswith("past")]
    if not presents and not pasts:
        raise RecipeError("kv_cache: the model has no past/present key-value tensors (no input named "
                          "past*, no output named present*): it is not a decoder with a KV cache",
                          pass_name="kv_cache", key="type")
    pairs, unmatched = [], []
    for out in presents:
        partner = next((inputs[n] for pat, rep in _PAST_SPELLINGS
                        for n in [re.sub(pat, rep, out.name)] if n in inputs), None)
        if partner is None:
            unmatched.append(out.name)
        else:
            pairs.append((partner, out))
    paired = {p.name for p, _ in pairs}
    lonely = [v.name for v in pasts if v.name not in paired]
    if unmatched or lonely:
        raise RecipeError("kv_cache: past/present tensors do not pair up: "
                          + "; ".join(filter(None, [f"outputs without a past input: {unmatched}" if unmatched else "",
                                                    f"past inputs without a present output: {lonely}" if lonely else ""])),
                          pass_name="kv_cache", key="type",
                          hint="pairs are named present<X> / past_key_values<X> (or past<X>, past_<X>)")
    for past, present in pairs:
        if past.shape is not None and present.shape is not None and past.shape.rank() != present.shape.rank():
            raise RecipeError(f"kv_cache: {past.name} has rank {past.shape.rank()} but {present.name} has rank "
                              f"{present.shape.rank()}", pass_name="kv_cache", key="type")
    return pairs


@register_pass("kv_cache")
class KVCache(QPass):
    """Quantize the KV cache a decoder passes between steps (present out, past in) to int8."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        dtype: Literal["int8"] = "int8"
        granularity: Literal["per_head", "per_channel"] = "per_head"
        samples: int = 32
        head_axis: int = 1  # [batch, kv_heads, sequence, head_dim], as Hugging Face exports it

        def validate(self):
            return at_least(self, samples=1)

    @classmethod
    def keeps_dynamic_shapes(cls, config) -> bool:
        return True  # the past length grows every decoding step

    @classmethod
    def check_model(cls, config, model: ir.Model) -> None:
        kv_pairs(model)   # a graph without a (paired) KV cache is refused before any work

    def run(self, model: ir.Model) -> bool:
        pairs = kv_pairs(model)
        if self.ctx.data is None:
            raise DataError("kv_cache needs calibration data (--calib) to choose the cache scales")
        absmax = self._absmax(model, [present for _, present in pairs])
        graph = model.graph
        codecs, report = {}, {"granularity": self.config.granularity, "pairs": {}}
        float_bytes = int8_bytes = 0
        for past, present in pairs:
            past_name, present_name = past.name, present.name
            scale = np.maximum(absmax[present_name], 1e-12) / _QMAX
            codec = self._codec(graph, scale, present_name.replace(".", "_") + "_cache")
            self._dequantize_on_entry(graph, past, codec)
            self._quantize_on_exit(graph, present, codec)
            codecs[past_name] = codecs[present_name] = {"dtype": "int8", "scale": scale.reshape(-1).tolist(),
                                                        "shape": list(scale.shape)}
            per_token = int(np.prod([d for i, d in enumerate(present.shape or []) if i not in (0, 2)
                                     and isinstance(d, int)]))
            float_bytes += 4 * per_token
            int8_bytes += per_token
            report["pairs"][present_name] = {"past": past_name, "scales": int(scale.size)}
        report["bytes_per_token"] = {"float32": float_bytes, "float16": float_bytes // 2, "int8": int8_bytes}
        model.metadata_props[METADATA_KEY] = json.dumps(codecs)
        self.ctx.reports["kv_cache"] = report
        graph.sort()
        return bool(pairs)

    def _absmax(self, model: ir.Model, presents: list[ir.Value]) -> dict[str, np.ndarray]:
        """max|x| per head ([1, H, 1, 1]) or per head and channel ([1, H, 1, D]) over the calibration data."""
        keep = {self.config.head_axis, -1} if self.config.granularity == "per_channel" else {self.config.head_axis}
        found: dict[str, np.ndarray] = {}
        for arrays, _ in stream_tensors(model, presents, self.ctx.data, samples=self.config.samples,
                                        label="kv_cache", progress=self.ctx.progress, memory=self.ctx.memory):
            for name, x in arrays.items():
                if not np.isfinite(x).all():
                    raise DataError(f"kv_cache: {name} holds NaN/Inf on the calibration data")
                axes = tuple(i for i in range(x.ndim) if i not in {k % x.ndim for k in keep})
                m = np.abs(x).max(axis=axes, keepdims=True) if x.size else None
                if m is not None:
                    found[name] = m if name not in found else np.maximum(found[name], m)
        missing = [v.name for v in presents if v.name not in found]
        if missing:
            raise DataError(f"kv_cache: the calibration data never filled {missing} (empty sequences?)")
        return {k: v.astype(np.float32) for k, v in found.items()}

    def _codec(self, graph: ir.Graph, scale: np.ndarray, base: str) -> _Codec:
        """The initializers one past/present pair shares for its Q and DQ nodes."""
        zero = np.zeros(scale.size if self.config.granularity == "per_head" else (), np.int8)
        zp = add_initializer(graph, f"{base}_zero_point", zero)
        if self.config.granularity == "per_head":
            return _Codec(add_initializer(graph, f"{base}_scale", scale.reshape(-1)), zp,
                          {"axis": self.config.head_axis}, None)
        return _Codec(add_initializer(graph, f"{base}_unit", np.asarray(1.0, np.float32)), zp, {},
                      add_initializer(graph, f"{base}_scale", scale))

    def _dequantize_on_entry(self, graph: ir.Graph, past: ir.Value, codec: _Codec) -> None:
        # a Shape of the past (the mask's past length) reads the int8 input itself: the same
        # shape, and no dependency on the dequantized cache a kernel may never widen
        uses = [(user, index) for user, index in past.uses() if user.op_type != "Shape"]
        past.dtype = ir.DataType.INT8
        out = _dequantize(graph, past, codec, past.name)
        for user, index in uses:
            user.replace_input_with(index, out)

    def _quantize_on_exit(self, graph: ir.Graph, present: ir.Value, codec: _Codec) -> None:
        name = present.name
        index = next(i for i, o in enumerate(graph.outputs) if o is present)
        inner_uses = list(present.uses())
        present.name = f"{name}_float"
        q = _quantize(graph, present, codec, name)
        graph.outputs[index] = q
        if inner_uses:  # the step attends to what the cache will hold
            deq = _dequantize(graph, q, codec, f"{name}_cached")
            for user, i in inner_uses:
                user.replace_input_with(i, deq)


@dataclasses.dataclass(frozen=True)
class _Codec:
    scale: ir.Value                # the Q/DQ scale: per head (axis attribute), or 1
    zero_point: ir.Value
    attrs: dict
    outer: ir.Value | None         # per_channel: the [1, H, 1, D] scale divided out before Q, multiplied after DQ


def _quantize(graph: ir.Graph, x: ir.Value, codec: _Codec, out_name: str) -> ir.Value:
    source = x
    if codec.outer is not None:
        div = ir.node("Div", [x, codec.outer], name=f"{out_name}_Scale")
        graph.append(div)
        source = div.outputs[0]
    node = ir.node("QuantizeLinear", [source, codec.scale, codec.zero_point], codec.attrs, name=f"{out_name}_Quantize")
    graph.append(node)
    out = node.outputs[0]
    out.name, out.dtype, out.shape = out_name, ir.DataType.INT8, x.shape
    return out


def _dequantize(graph: ir.Graph, q: ir.Value, codec: _Codec, base: str) -> ir.Value:
    node = ir.node("DequantizeLinear", [q, codec.scale, codec.zero_point], codec.attrs, name=f"{base}_Dequantize")
    graph.append(node)
    out = node.outputs[0]
    if codec.outer is not None:
        mul = ir.node("Mul", [out, codec.outer], name=f"{base}_Rescale")
        graph.append(mul)
        out = mul.outputs[0]
    out.name, out.dtype, out.shape = f"{base}_dequantized", ir.DataType.FLOAT, q.shape
    return out
