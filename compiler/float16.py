"""float16 / bfloat16 models compile in float32 inside and keep their own I/O types.

Exported half-precision models (onnxconverter-common with or without `keep_io_types`, a
`model.half()` export) are common for NPUs and GPUs. Every pass here computes statistics,
scales and rewrites in float32 and emits float32 QuantizeLinear/DequantizeLinear scales, and
onnxruntime's CPU int8 kernels are float32 around the integer core. So the compile widens
the model first: half-precision initializers, constants, casts and value types become
float32 (the widened model computes what the half model computes, without its rounding);
the passes, calibration included, run on that; at the end the graph inputs and outputs
that were half get a Cast back, so the compiled model takes and returns what the original
did. Float tensors that stay float (layers kept float, norms, biases) are stored as float32:
the cpu target computes them in float32 anyway, and ATC casts to float16 itself for Ascend.
Verification runs the original half model in onnxruntime, as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype",
                "Bernoulli": "dtype"}
_TENSOR_ATTRS = {"Constant": "value", "ConstantOfShape": "value"}


@dataclasses.dataclass(frozen=True)
class HalfPrecisionIO:
    """What widening changed: the graph I/O that was half (name -> its type) and counts."""
    dtype: ir.DataType                      # the model's half type (float16 or bfloat16)
    inputs: dict[str, ir.DataType]
    outputs: dict[str, ir.DataType]
    initializers: int
    nodes: int

    def describe(self) -> dict:
        return {"dtype": self.dtype.name.lower(), "inputs": sorted(self.inputs), "outputs": sorted(self.outputs),
                "widened_initializers": self.initializers, "widened_nodes": self.nodes,
                "note": "compiled in float32 inside; half-precision graph I/O kept through Casts"}


def half_dtype(model: ir.Model) -> ir.DataType | None:
    """The half type the model's float tensors use (the most frequent of float16/bfloat16
    among initializers and graph I/O), or None for a float32 model."""
    seen = [v.dtype for v in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values())
            if v.dtype in HALF]
    return max(set(seen), key=seen.count) if seen else None


def widen(model: ir.Model) -> HalfPrecisionIO | None:
    """Make a half-precision model float32 in place; None when there was nothing half."""
    dtype = half_dtype(model)
    if dtype is None:
        return None
    inputs = {v.name: v.dtype for v in model.graph.inputs if v.dtype in HALF}
    outputs = {v.name: v.dtype for v in model.graph.outputs if v.dtype in HALF}
    inits = 0
    for value in model.graph.initializers.values():
        if value.dtype in HALF and value.const_value is not None:
            value.const_value = widened_tensor(value.const_value, value.name)
            value.dtype = ir.DataType.FLOAT
            inits += 1
    nodes = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        nodes += _widen_node(node)
        for out in node.outputs:
            if out.dtype in HALF:
                out.dtype = ir.DataType.FLOAT
    for value in model.graph.inputs:
        if value.dtype in HALF:
            value.dtype = ir.DataType.FLOAT
    return HalfPrecisionIO(dtype, inputs, outputs, inits, nodes)


def widened_tensor(tensor, name: str):
    """`tensor` as float32. One still in the model's external data file stays there: a lazy
    tensor reads and widens it at each use and keeps nothing (a 7B float16 model would be
    27 GB widened in memory); one already in memory is widened once."""
    if not isinstance(tensor, ir.ExternalTensor):
        return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=name)

    def load():   # the source reads into a fresh array and stays unmapped (compiler/weight_store.py)
        return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=name)

    return ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=tensor.shape, name=name)


def _widen_node(node: ir.Node) -> int:
    changed = 0
    name = _DTYPE_ATTRS.get(node.op_type)
    if name and name in node.attributes and node.attributes[name].value in (int(d) for d in HALF):
        node.attributes[name] = ir.AttrInt64(name, int(ir.DataType.FLOAT))
        changed = 1
    name = _TENSOR_ATTRS.get(node.op_type)
    if name and name in node.attributes:
        tensor = node.attributes[name].value
        if getattr(tensor, "dtype", None) in HALF:
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32)))
            changed = 1
    return changed


def narrow_io(model: ir.Model, io: HalfPrecisionIO) -> None:
    """Give the compiled graph the original's half-precision inputs and outputs back: a Cast
    after each such input and before each such output (I/O a pass made integer, such as an
    int8 KV cache, stays as the pass left it)."""
    graph = model.graph
    for index, value in enumerate(list(graph.inputs)):
        want = io.inputs.get(value.name)
        if want is None or value.dtype != ir.DataType.FLOAT:
            continue
        name, value.name = value.name, f"{value.name}__float32"
        half = ir.Value(name=name, type=ir.TensorType(want), shape=value.shape)
        cast = _cast(half, ir.DataType.FLOAT, f"{name}__widened")
        value.replace_all_uses_with(cast.outputs[0])
        graph.inputs[index] = half
        graph.insert_before(graph.node(0), cast)
    for index, value in enumerate(list(graph.outputs)):
        want = io.outputs.get(value.name)
        if want is None or value.dtype != ir.DataType.FLOAT:
            continue
        name, value.name = value.name, f"{value.name}__float32"
        cast = _cast(value, want, name)
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]


def _cast(value: ir.Value, to: ir.DataType, out_name: str) -> ir.Node:
    """Cast(value) to `to`, its output named `out_name` and shaped like `value`."""
    node = ir.node("Cast", [value], {"to": int(to)}, name=f"{out_name}__Cast")
    out = node.outputs[0]
    out.name, out.dtype, out.shape = out_name, to, value.shape
    return node
