"""TensorRT's explicit-quantization MatMul, matched back to its parts for the CUDA kernels.

quantize writes each int8 linear of the cuda target as MatMul(DQ(Q(x)), DQ(W_int8)) (+ a bias
Add): the activation's Q/DQ pair (possibly shared by several layers reading x), the weight's
per-channel DequantizeLinear. cuda_kernels replaces that layer by one per-token W8A8 node;
this module finds the parts, or says why a layer cannot be served.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.backends.cpu.kernel_match import bias_reader, const, producer, sole_reader


@dataclasses.dataclass
class StaticQdqMatMul:
    """A MatMul of model.onnx in TensorRT's explicit-quantization form, matched back to its parts."""
    layer: str
    x: ir.Value                 # the float tensor the activation QuantizeLinear reads
    weight: ir.Value            # constant int8 [K, N]
    weight_scale: ir.Value      # constant float32 [N] or scalar
    bias: ir.Value | None       # constant float32 [N] of an Add after the MatMul
    output: ir.Value            # the layer's result (after the bias Add when there is one)
    nodes: list[ir.Node]        # what the kernel replaces (the activation Q/DQ may be shared: left to cleanup)


def match_static_qdq_matmul(node: ir.Node) -> StaticQdqMatMul | str | None:
    """The parts of a Q/DQ-quantized MatMul, a reason it cannot be served, or None (not one)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gemm" and producer(node.inputs[1], "DequantizeLinear") is not None:
        return "a Gemm (the kernels serve MatMul: canonicalize.gemm=to_matmul_add writes one)"
    if node.op_type != "MatMul" or len(node.inputs) != 2:
        return None
    act_dq, w_dq = producer(node.inputs[0], "DequantizeLinear"), producer(node.inputs[1], "DequantizeLinear")
    act_q = producer(act_dq.inputs[0], "QuantizeLinear") if act_dq is not None else None
    if act_q is None or w_dq is None:
        return None
    weight = const(w_dq.inputs[0])
    if weight is None or weight.dtype != np.int8 or weight.ndim != 2:
        return "its weight is not an int8 matrix (int8 per-channel weights only)"
    if act_dq.inputs[0].dtype != ir.DataType.INT8:
        return "its activation is not int8"
    k, n = weight.shape
    w_scale = const(w_dq.inputs[1])
    w_zero = const(w_dq.inputs[2]) if len(w_dq.inputs) > 2 and w_dq.inputs[2] is not None else None
    if w_scale is None or w_scale.dtype != np.float32 or w_scale.size not in (1, n) or \
            (w_scale.size == n and w_dq.attributes.get_int("axis", 1) not in (1, -1)) or \
            (w_zero is not None and np.any(w_zero != 0)):
        return "its weight scale is not one per output column (or a zero point is not 0)"
    if k % 16 or n % 4:
        return f"K={k} is not a multiple of 16 or N={n} not of 4 (the GEMM reads 16-byte vectors)"
    if node.outputs[0].dtype not in (ir.DataType.FLOAT, None):
        return "its output is not float32"
    x, output, nodes = act_q.inputs[0], node.outputs[0], [node, w_dq]
    unshifted = _undo_shift(x, output, weight.astype(np.float64) * w_scale.astype(np.float64).reshape(1, -1))
    if unshifted is not None:       # per-token scales need no zero point: the kernel reads the tensor itself
        x, compensation = unshifted
        nodes.append(compensation)
        output = compensation.outputs[0]
    bias = None
    reader = bias_reader(output, n)
    if reader is not None and reader[0].op_type == "Add":
        nodes.append(reader[0])
        output, bias = reader[0].outputs[0], reader[1]
    return StaticQdqMatMul(node.name, x, w_dq.inputs[0], w_dq.inputs[1], bias, output, nodes)


def _undo_shift(x: ir.Value, output: ir.Value, weight: np.ndarray) -> tuple[ir.Value, ir.Node] | None:
    """(the unshifted tensor, the compensation Add) where quantize shifted a one-sided input
    (passes/quantize/shifts.py: Add(x, c) before the Q/DQ, Add(y, -c·colsum(W)) after the MatMul).

    The shift emulates a zero point for a static symmetric scale. A per-token symmetric scale
    fed the shifted tensor would waste half its grid instead (MiniLM's FFN outputs: 16.3 dB for
    the whole model against 18.9 for model.onnx), so the kernel reads x itself and the
    compensation goes. Recognised by the arithmetic, not by names: the Add after the MatMul
    must hold exactly -c times the dequantized weight's column sums."""
    shift_add = producer(x, "Add")
    shift = const(shift_add.inputs[1]) if shift_add is not None and len(shift_add.inputs) == 2 else None
    compensation = sole_reader(output)
    if shift is None or shift.size != 1 or compensation is None or compensation.op_type != "Add" or \
            compensation.inputs[0] is not output:
        return None
    found = const(compensation.inputs[1])
    expected = -float(shift.reshape(())) * weight.sum(axis=0)
    if found is None or found.shape != expected.shape or \
            not np.allclose(found, expected, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(expected).max()))):
        return None
    return shift_add.inputs[0], compensation
