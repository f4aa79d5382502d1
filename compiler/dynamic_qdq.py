"""Run-time (dynamic) activation quantization, emitted as standard ONNX integer ops.

A QuantizeLinear/DequantizeLinear pair needs its scale as a constant, so dynamic
activations cannot be written as QDQ. They are written as what they compute:

* per-token (one symmetric int8 scale per row of the last axis):
  ``s = max(ReduceMax(|x|, -1) / 127, 1e-12)``, ``q = Clip(Round(x / s), -127, 127)``,
  stored as ``uint8(q + 128)`` with zero point 128 so onnxruntime's fast U8S8
  MatMulInteger runs it (S8S8 MatMulInteger measured 7x slower on x86), then
  ``MatMulInteger → Cast → ·s → ·s_w (+ bias)``;
* per-tensor: ``DynamicQuantizeLinear`` (uint8, asymmetric) → ``MatMulInteger`` /
  ``ConvInteger`` → ``Cast`` → ``·(s_x·s_w)`` (+ bias), the form onnxruntime's
  ``quantize_dynamic`` emits.

Every op is in the default ONNX domain, so the graph runs in any ONNX runtime and
verification runs exactly what ships. numerics.dynamic_quantize_per_token is the
numpy twin of the per-token arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .qdq import add_initializer, take_over

_EPS = np.float32(1e-12)


def _node(graph: ir.Graph, op: str, inputs, name: str, dtype: ir.DataType, shape=None, **attrs) -> ir.Value:
    node = ir.node(op, inputs, attrs, name=name)
    out = node.outputs[0]
    out.name = name
    out.dtype = dtype
    if shape is not None:
        out.shape = shape
    graph.append(node)
    return out


def _const(graph: ir.Graph, name: str, array) -> ir.Value:
    return add_initializer(graph, name, np.asarray(array))


def per_token_quantize(graph: ir.Graph, x: ir.Value, base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(q as uint8 with zero point 128, per-row float scale [..., 1], the zero point value)."""
    f = ir.DataType.FLOAT
    absx = _node(graph, "Abs", [x], f"{base}_abs", f, x.shape)
    axes = _const(graph, f"{base}_axes", np.array([-1], dtype=np.int64))
    amax = _node(graph, "ReduceMax", [absx, axes], f"{base}_absmax", f, keepdims=1)
    s0 = _node(graph, "Div", [amax, _const(graph, f"{base}_qmax", np.float32(127))], f"{base}_scale0", f)
    scale = _node(graph, "Max", [s0, _const(graph, f"{base}_eps", _EPS)], f"{base}_scale", f)
    ratio = _node(graph, "Div", [x, scale], f"{base}_ratio", f, x.shape)
    rounded = _node(graph, "Round", [ratio], f"{base}_round", f, x.shape)
    clipped = _node(graph, "Clip", [rounded, _const(graph, f"{base}_lo", np.float32(-127)),
                                    _const(graph, f"{base}_hi", np.float32(127))], f"{base}_clip", f, x.shape)
    shifted = _node(graph, "Add", [clipped, _const(graph, f"{base}_offset", np.float32(128))],
                    f"{base}_shift", f, x.shape)
    q = _node(graph, "Cast", [shifted], f"{base}_quantized", ir.DataType.UINT8, x.shape, to=ir.DataType.UINT8)
    zp = _const(graph, f"{base}_zero_point", np.uint8(128))
    return q, scale, zp


def per_tensor_quantize(graph: ir.Graph, x: ir.Value, base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """DynamicQuantizeLinear: (uint8 q, scalar scale, scalar zero point)."""
    node = ir.node("DynamicQuantizeLinear", [x], name=f"{base}_DynamicQuantizeLinear", num_outputs=3)
    q, s, z = node.outputs
    for v, suffix, dtype in ((q, "quantized", ir.DataType.UINT8), (s, "scale", ir.DataType.FLOAT),
                             (z, "zero_point", ir.DataType.UINT8)):
        v.name, v.dtype = f"{base}_{suffix}", dtype
    q.shape = x.shape
    graph.append(node)
    return q, s, z


def integer_layer(graph: ir.Graph, node: ir.Node, x: ir.Value, w_q: np.ndarray, w_scale: np.ndarray,
                  bias: np.ndarray | None, *, per_token: bool) -> ir.Value:
    """Replace float `node` (MatMul/Gemm/Conv with constant weight) by its dynamic-int8 form.

    `w_q` is int8, already laid out for MatMulInteger ([K, N]) or ConvInteger ([Cout, ...]);
    `w_scale` is per output channel (or one value). Returns the new output value, which
    takes over the old output's name and uses.
    """
    base = node.name or node.outputs[0].name
    old_out = node.outputs[0]
    f = ir.DataType.FLOAT
    if per_token:
        xq, xs, xz = per_token_quantize(graph, x, f"{base}_dynq")
    else:
        xq, xs, xz = per_tensor_quantize(graph, x, f"{base}_dynq")
    wq = _const(graph, f"{base}_weight_quantized", w_q.astype(np.int8))
    conv = node.op_type == "Conv"
    if conv:
        attrs = {k: a.value for k, a in node.attributes.items()}
        acc = _node(graph, "ConvInteger", [xq, wq, xz], f"{base}_ConvInteger", ir.DataType.INT32, old_out.shape,
                    **attrs)
        channel_shape = (1, -1) + (1,) * (len(w_q.shape) - 2)
    else:
        acc = _node(graph, "MatMulInteger", [xq, wq, xz], f"{base}_MatMulInteger", ir.DataType.INT32, old_out.shape)
        channel_shape = (-1,)
    accf = _node(graph, "Cast", [acc], f"{base}_accumulator", f, old_out.shape, to=f)
    ws = np.asarray(w_scale, dtype=np.float32)
    ws = ws.reshape(channel_shape) if ws.size > 1 else ws.reshape(())
    y = _node(graph, "Mul", [accf, xs], f"{base}_rescale_x", f, old_out.shape)
    y = _node(graph, "Mul", [y, _const(graph, f"{base}_weight_scale", ws)], f"{base}_rescale", f, old_out.shape)
    if bias is not None:
        b = np.asarray(bias, dtype=np.float32).reshape(channel_shape)
        y = _node(graph, "Add", [y, _const(graph, f"{base}_bias", b)], f"{base}_bias_add", f, old_out.shape)
    take_over(graph, old_out, y, [node])
    return y
