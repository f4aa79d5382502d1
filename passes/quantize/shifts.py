"""One-sided activations on a symmetric-only target: quantized as if with a zero point.

Why: TensorRT's int8 is symmetric (zero point 0). A tensor that is one-sided — a GELU output
runs from -0.17 up, a ReLU output from 0 — then spends half of its 255 codes on values that
never occur: MiniLM `w8a8-smooth` on `cuda` lost 5 dB against asymmetric int8 (docs/cuda.md).
Asymmetric int8 with scale s and zero point z computes round(x/s) + z; the same integers come
out of a symmetric quantizer fed x + z·s. So the tensor gets an Add(x, z·s) in front of its
QuantizeLinear, and each MatMul reading it gets -z·s·colsum(W) added to its output (the weight
as the graph dequantizes it), under the MatMul output's name: every tensor the original graph
has keeps its value. Exact for MatMul (no padding); only tensors whose every quantized reader is
a MatMul with a constant weight are shifted. A per-channel shift would not do: it moves the
zeros of a sparse activation off the grid (tried: MiniLM 13.6 -> 7.6 dB).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.numerics import compute_qparams
from qcompile.qdq import add_initializer

# shift only where the asymmetric grid is this much finer than the symmetric one
MIN_GAIN = 1.25


def _weight_dequantized(node: ir.Node) -> np.ndarray | None:
    """A MatMul's constant [K, N] weight as its DequantizeLinear gives it (per-tensor or per-column)."""
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
        return None
    q = dq.inputs[0].const_value.numpy().astype(np.float64)
    scale = dq.inputs[1].const_value.numpy().astype(np.float64) if dq.inputs[1].const_value is not None else None
    if q.ndim != 2 or scale is None or dq.attributes.get_int("block_size", 0):
        return None
    zp = dq.inputs[2].const_value.numpy().astype(np.float64) if len(dq.inputs) > 2 and dq.inputs[2] is not None \
        and dq.inputs[2].const_value is not None else 0.0
    if scale.size > 1 and dq.attributes.get_int("axis", 1) % 2 != 1:
        return None
    return (q - np.reshape(zp, (1, -1)) if np.ndim(zp) else q - zp) * np.reshape(scale, (1, -1))


def shiftable(value: ir.Value, consumers: set[ir.Node] | None) -> list[tuple[ir.Node, np.ndarray]] | None:
    """[(MatMul, its dequantized weight)] when every quantized reader of `value` is a MatMul
    reading it as its first input against a constant weight; else None."""
    if not consumers:
        return None
    found = []
    for node in consumers:
        w = _weight_dequantized(node) if node.op_type == "MatMul" and node.inputs[0] is value else None
        if w is None:
            return None
        found.append((node, w))
    return found


def shift_params(lo: float, hi: float, symmetric_scale: float) -> tuple[float, float] | None:
    """(asymmetric int8 scale s, shift z·s) for the range, or None when it gains too little."""
    scale, zp = compute_qparams(lo, hi, "int8", symmetric=False)
    s, z = float(np.asarray(scale).reshape(())), float(np.asarray(zp).reshape(()))
    if not s > 0 or symmetric_scale / s < MIN_GAIN:
        return None
    return s, z * s


def apply_shift(graph: ir.Graph, value: ir.Value, shift: float, readers: list[tuple[ir.Node, np.ndarray]]) -> ir.Value:
    """Add(value, shift) in front of the readers, and -shift·colsum(W) after each; returns the
    shifted value (the one the Q/DQ pair goes on)."""
    base = value.name
    add = ir.node("Add", [value, add_initializer(graph, f"{base}_shift", np.float32(shift))], name=f"{base}_shift/Add")
    shifted = add.outputs[0]
    shifted.name, shifted.dtype, shifted.shape = f"{base}_shifted", value.dtype, value.shape
    graph.insert_after(value.producer(), add) if value.producer() is not None else graph.insert_before(
        readers[0][0], add)
    for node, w in readers:
        node.replace_input_with(0, shifted)
        y = node.outputs[0]
        uses = list(y.uses())
        comp = add_initializer(graph, f"{node.name}_shift_compensation", (-shift * w.sum(axis=0)).astype(np.float32))
        fix = ir.node("Add", [y, comp], name=f"{node.name}_shift/Add")
        out = fix.outputs[0]
        out.dtype, out.shape = y.dtype, y.shape
        graph.insert_after(node, fix)
        for user, index in uses:
            user.replace_input_with(index, out)
        for i, o in enumerate(graph.outputs):
            if o is y:
                graph.outputs[i] = out
        name = y.name
        y.name, out.name = f"{name}_unshifted", name     # the layer's tensor keeps its meaning and name
    return shifted
