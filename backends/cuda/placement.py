"""Where the Q/DQ nodes of an explicit-quantization graph sit, against TensorRT's placement rules.

TensorRT builds int8 (FP8) kernels from the Q/DQ it finds: DequantizeLinear on every input of a
Conv/ConvTranspose/Gemm/MatMul (the weight an int8 initializer behind a per-channel
DequantizeLinear), no QuantizeLinear on their outputs unless what reads it is another quantized
layer (then the Q is that layer's input quantizer, which TensorRT fuses as the producer's int8
output) or a residual Add's skip input, the Add's other input the Conv's float output. This walks
a graph and says, per rule, what holds and what does not: `cuda_lower` reports it and the tests
assert it.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qcompile.passes.quantize.residuals import residual_skip

LAYERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_STANDARD = ("", "ai.onnx")


def _dq(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _weight_index(node: ir.Node) -> int | None:
    """The input holding the layer's weight (a DequantizeLinear of a constant), or None."""
    for i, v in enumerate(node.inputs[:2]):
        dq = _dq(v)
        if dq is not None and dq.inputs[0].const_value is not None:
            return i
    return None


@dataclasses.dataclass
class Placement:
    """What a graph's Q/DQ placement is, rule by rule (names of the nodes each finding is about)."""
    layers: list[str] = dataclasses.field(default_factory=list)               # quantized layers
    weights_per_channel: int = 0
    weights_per_tensor: int = 0
    float_inputs: list[str] = dataclasses.field(default_factory=list)         # a quantized layer reading a float activation
    outputs_for_next_layer: int = 0      # a layer output quantized because a quantized layer reads it
    outputs_unexpected: list[str] = dataclasses.field(default_factory=list)  # quantized for no quantized reader
    residual_skips_quantized: list[str] = dataclasses.field(default_factory=list)
    residual_skips_float: list[str] = dataclasses.field(default_factory=list)
    foreign_ops: list[str] = dataclasses.field(default_factory=list)          # domain::op TensorRT cannot parse

    def problems(self) -> list[str]:
        out = []
        if self.float_inputs:
            out.append(f"{len(self.float_inputs)} quantized layers read a float activation (e.g. {self.float_inputs[0]}): "
                       "TensorRT runs them in float")
        if self.outputs_unexpected:
            out.append(f"{len(self.outputs_unexpected)} layer outputs are quantized with no quantized reader "
                       f"(e.g. {self.outputs_unexpected[0]}): an extra int8 round trip")
        if self.residual_skips_float:
            out.append(f"{len(self.residual_skips_float)} residual Adds after a quantized Conv keep a float skip input "
                       f"(e.g. {self.residual_skips_float[0]}): TensorRT cannot fuse the Add into the Conv")
        return out

    def summary(self) -> dict:
        return {"quantized_layers": len(self.layers), "weights_per_channel": self.weights_per_channel,
                "weights_per_tensor": self.weights_per_tensor, "float_inputs": self.float_inputs,
                "outputs_quantized_for_next_layer": self.outputs_for_next_layer,
                "outputs_quantized_unexpectedly": self.outputs_unexpected,
                "residual_skips_quantized": len(self.residual_skips_quantized),
                "residual_skips_float": self.residual_skips_float, "foreign_ops": self.foreign_ops}


def placement(graph: ir.Graph) -> Placement:
    found = Placement()
    quantized: set[ir.Node] = set()
    for node in graph:
        if node.domain not in _STANDARD:
            found.foreign_ops.append(f"{node.domain}::{node.op_type} ({node.name})")
        if node.op_type not in LAYERS or node.domain not in _STANDARD:
            continue
        w = _weight_index(node)
        acts = [v for i, v in enumerate(node.inputs[:2]) if v is not None and i != w and v.const_value is None]
        if w is None and not any(_dq(v) for v in acts):
            continue                                     # a float layer
        quantized.add(node)
        found.layers.append(node.name)
        if w is not None:
            dq = _dq(node.inputs[w])
            scale = dq.inputs[1].const_value
            per_channel = scale is not None and scale.size > 1
            found.weights_per_channel += per_channel
            found.weights_per_tensor += not per_channel
        if any(_dq(v) is None for v in acts):
            found.float_inputs.append(node.name)
    for node in quantized:
        out = node.outputs[0]
        for use in out.uses():
            q = use.node
            if q.op_type != "QuantizeLinear":
                continue
            readers = [u.node for dq in q.outputs[0].uses() if dq.node.op_type == "DequantizeLinear"
                       for u in dq.node.outputs[0].uses()]
            if any(r in quantized for r in readers) or any(r.op_type == "Add" for r in readers):
                found.outputs_for_next_layer += 1
            else:
                found.outputs_unexpected.append(node.name)
    conv_outputs = {n.outputs[0] for n in quantized if n.op_type in ("Conv", "ConvTranspose")}
    for node in graph:
        skip = residual_skip(node, conv_outputs)
        if skip is not None:
            (found.residual_skips_quantized if _dq(skip) is not None else found.residual_skips_float).append(node.name)
    return found
