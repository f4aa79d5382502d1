"""Per-token dynamic W8A8 MatMul: compiler/dynamic_qdq.py's standard-op chain, as one op.

onnxruntime has no fused op for per-token dynamic W8A8 MatMul (its DynamicQuantizeMatMul is
per tensor), so `w8a8-dynamic` layers run as eleven standard ops around MatMulInteger. This
module matches that chain back to its parts and replaces it with one
`com.qcompile.QMatMulPerToken` node (backends/cpu/kernels/QMatMulPerToken.cpp.j2), which also
takes the layer's bias and the GELU after it (a BiasGelu, or a Gelu after the bias Add).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.kernelgen import DOMAIN, KernelSpec
from qcompile.qdq import add_initializer

from .kernel_match import bias_reader, const, gelu_reader, is_scalar, only_use, producer, take_over_layer

OP = "QMatMulPerToken"


@dataclasses.dataclass
class PerTokenMatMul:
    """One per-token W8A8 MatMul in the standard-op form, matched back to its parts."""
    layer: str
    x: ir.Value
    weight: ir.Value            # constant int8 [K, N]
    weight_scale: ir.Value      # constant float32 [N] or scalar
    bias: ir.Value | None       # constant float32 [N]
    output: ir.Value
    nodes: list[ir.Node]
    gelu: bool = False          # the GELU after the layer (a com.microsoft Gelu, or BiasGelu) is the kernel's too


def match_per_token_matmul(mmi: ir.Node) -> PerTokenMatMul | None:
    """The dynamic_qdq per-token chain ending in this MatMulInteger, or None.

    A structural walk rather than an onnxscript rewrite rule: the replacement must keep the
    layer's name (verify's per-layer table and the report match layers by node name) and the
    chain's own weight, scale and bias initializers."""
    if mmi.op_type != "MatMulInteger" or len(mmi.inputs) != 3 or not is_scalar(mmi.inputs[2], 128):
        return None
    weight = const(mmi.inputs[1])
    if weight is None or weight.dtype != np.int8 or weight.ndim != 2:
        return None
    cast = producer(mmi.inputs[0], "Cast")
    shift = producer(cast.inputs[0], "Add") if cast else None
    clip = producer(shift.inputs[0], "Clip") if shift and is_scalar(shift.inputs[1], 128) else None
    clipped = clip is not None and is_scalar(clip.inputs[1], -127) and is_scalar(clip.inputs[2], 127)
    rnd = producer(clip.inputs[0], "Round") if clipped else None
    ratio = producer(rnd.inputs[0], "Div") if rnd else None
    scale_node = producer(ratio.inputs[1], "Max") if ratio else None
    if scale_node is None or not is_scalar(scale_node.inputs[1], float(np.float32(1e-12))):
        return None
    x = ratio.inputs[0]
    div127 = producer(scale_node.inputs[0], "Div")
    amax = producer(div127.inputs[0], "ReduceMax") if div127 and is_scalar(div127.inputs[1], 127) else None
    absx = producer(amax.inputs[0], "Abs") if amax else None
    axes = const(amax.inputs[1]) if amax and len(amax.inputs) > 1 else None
    if absx is None or absx.inputs[0] is not x or axes is None or axes.tolist() != [-1] \
            or amax.attributes.get_int("keepdims", 1) != 1:
        return None
    scale = scale_node.outputs[0]
    acc_cast = only_use(mmi.outputs[0], "Cast")
    rescale_x = only_use(acc_cast.outputs[0], "Mul") if acc_cast else None
    if rescale_x is None or rescale_x.inputs[1] is not scale:
        return None
    rescale_w = only_use(rescale_x.outputs[0], "Mul")
    n = weight.shape[1]
    weight_scale = const(rescale_w.inputs[1]) if rescale_w else None
    if weight_scale is None or weight_scale.size not in (1, n) or weight_scale.ndim > 1:
        return None
    nodes = [absx, amax, div127, scale_node, ratio, rnd, clip, shift, cast, mmi, acc_cast, rescale_x, rescale_w]
    inner = [absx, amax, div127, ratio, rnd, clip, shift, cast, mmi, acc_cast, rescale_x]
    if any(len(v.uses()) != 1 or v.is_graph_output() for node in inner for v in node.outputs):
        return None
    if len(scale.uses()) != 2 or scale.is_graph_output() or len(x.uses()) < 2:
        return None
    output, bias = rescale_w.outputs[0], None
    reader = bias_reader(output, n)
    activation = None
    if reader is not None and reader[0].op_type == "Add":
        nodes.append(reader[0])
        output, bias = reader[0].outputs[0], reader[1]
        activation = gelu_reader(output)
    elif reader is not None:              # BiasGelu: its bias and its GELU go into the kernel
        activation, bias = reader
    else:
        activation = gelu_reader(output)
    if activation is not None:
        nodes.append(activation)
        output = activation.outputs[0]
    layer = mmi.name[:-len("_MatMulInteger")] if mmi.name.endswith("_MatMulInteger") else mmi.name
    return PerTokenMatMul(layer, x, mmi.inputs[1], rescale_w.inputs[1], bias, output, nodes, activation is not None)


def qmatmul_spec(weight: ir.Value, isa: str, family: str = "cpu", gelu: bool = False) -> KernelSpec:
    k, n = weight.const_value.shape
    return KernelSpec(op=OP, family=family, isa=isa,
                      dtypes=(("activation", "int8"), ("weight", "int8"), ("output", "float32")),
                      static_dims=(("K", int(k)), ("N", int(n))), dynamic_dims=("M",),
                      scale_layout="per_token x per_channel", epilogue="bias+gelu" if gelu else "bias")


def matched_spec(match: PerTokenMatMul, isa: str, family: str) -> KernelSpec:
    return qmatmul_spec(match.weight, isa, family, match.gelu)


def qmatmul_to_generated(graph: ir.Graph, match: PerTokenMatMul, spec: KernelSpec) -> ir.Value:
    """Replace the matched standard-op chain by one com.qcompile.QMatMulPerToken node; returns
    the value holding the layer's result (kernel_match.take_over_layer)."""
    base = match.layer
    bias = match.bias
    if bias is None:
        bias = add_initializer(graph, f"{base}_bias", np.zeros(match.weight.const_value.shape[1], np.float32))
    inputs = [match.x, match.weight, match.weight_scale, bias]   # the chain's own constants, shared
    node = ir.node(OP, inputs, {"spec": spec.id}, domain=DOMAIN, name=base)
    out = node.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, match.output.shape
    graph.append(node)
    return take_over_layer(graph, match.output, out, match.nodes[::-1])
