"""Bias correction (Nagel et al. 2019, data-free quantization — CLE's companion): a layer's bias
absorbs the output mean shift its weight rounding causes, b -= (W_q - W)·E[x], with E[x] per
input channel from calibration. Run by `quantize` (`bias_correction: true`) once it has the
quantized weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.numerics import dequantize
from qcompile.qdq import add_initializer


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def correct_bias(graph: ir.Graph, node: ir.Node, w_val: ir.Value, q: np.ndarray, w_scale: np.ndarray,
                 axis: int | None, mean: np.ndarray | None, bias: ir.Value | None, notes: list[str], *,
                 plain_weights: bool) -> ir.Value | None:
    """Conv and Gemm biases (added when the layer has none); `axis`: the per-channel weight axis
    (None: per tensor); `mean`: E[x] per input channel; `plain_weights`: symmetric per-tensor or
    per-channel integers (grouped or offset weights are not handled). Returns the bias value the
    layer reads. MatMul keeps its mean shift (it has no bias input here)."""
    if mean is None or node.op_type == "MatMul":
        if node.op_type == "MatMul":
            notes.append("bias correction: MatMul has no bias input here; not corrected")
        return bias
    if not plain_weights:
        return bias
    w = w_val.const_value.numpy().astype(np.float64)
    deq = dequantize(q, w_scale, np.zeros_like(w_scale, dtype=np.int64), axis=axis).astype(np.float64)
    dw = deq - w
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        cout, cin_g = dw.shape[:2]
        if mean.size != cin_g * groups:
            return bias
        per_o = mean.reshape(groups, cin_g)[np.arange(cout) // (cout // groups)]      # [Cout, Cin/g]
        shift = np.sum(dw.reshape(cout, cin_g, -1).sum(axis=2) * per_o, axis=1)
    else:  # Gemm: B [K, N], or [N, K] with transB
        transposed = node.attributes.get_int("transB", 0)
        shift = dw @ mean if transposed else mean @ dw
    old = _const(bias) if bias is not None else np.zeros(shift.shape, dtype=np.float32)
    if old is None or old.size != shift.size:
        return bias
    corrected = (old.reshape(-1) - shift).astype(np.float32).reshape(old.shape)
    value = add_initializer(graph, f"{node.name}_bias_corrected", corrected)
    if bias is None:  # a Conv/Gemm without a bias gets one
        node.resize_inputs(3)
    node.replace_input_with(2, value)
    notes.append(f"bias corrected (max |shift| {float(np.abs(shift).max()):.3g})")
    return value
