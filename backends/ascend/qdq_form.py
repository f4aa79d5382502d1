"""Reading the QDQ form of a quantized layer: its activation Q/DQ, int8 weights and their
scales, the int32 bias, and the numbers AscendQuant/AscendDequant take from them. Pure
functions of the graph, shared by the lowering rules."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import formulas


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def unique_init_name(graph: ir.Graph, base: str, reserved: set[str] = frozenset()) -> str:
    """A fresh initializer name (the rewriter registers a rewrite's initializers after it)."""
    name, i = base, 0
    while name in graph.initializers or name in reserved:
        i += 1
        name = f"{base}_{i}"
    return name


def initializer(op, graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    name = unique_init_name(graph, base)
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


def activation_problem(x: ir.Value, x_scale: ir.Value, x_zp: ir.Value) -> str | None:
    s, z = const(x_scale), const(x_zp)
    if s is None or z is None or s.size != 1 or z.size != 1:
        return "activation scale/zero point are not constant scalars (AscendQuant takes scalar attributes)"
    if x_zp.dtype != ir.DataType.INT8:
        return f"activation quantized to {x_zp.dtype}, AscendQuant outputs int8"
    if not (np.isfinite(s).all() and float(s.reshape(())) > 0):
        return "activation scale is not positive"
    if int(z.reshape(())) != 0:  # e.g. a pre-quantized model's asymmetric activations
        return (f"activation zero point is {int(z.reshape(()))}, not 0: the int8 layer would need an offset "
                "correction (Ascend's int8 layers here take symmetric activations)")
    if x.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"activation of type {x.dtype} (AscendQuant takes float32/float16)"
    return None


def weight_params(w_q: ir.Value, w_scale: ir.Value, w_zp: ir.Value | None) -> tuple[np.ndarray, np.ndarray] | str:
    w, s = const(w_q), const(w_scale)
    if w is None or s is None:
        return "weight is not a constant int8 initializer"
    if w_q.dtype != ir.DataType.INT8:
        return f"weight stored as {w_q.dtype}, Ascend's int8 kernels take int8 weights"
    z = const(w_zp) if w_zp is not None else np.zeros(1, np.int8)
    if z is None or np.any(z != 0):
        return "weight zero point is not 0 (Ascend's int8 kernels take symmetric weights)"
    return w, s.astype(np.float32).reshape(-1)


def dq_axis(dq_out: ir.Value, ndim: int) -> int | None:
    node = dq_out.producer()
    scale = const(node.inputs[1])
    if scale is None or scale.size == 1:
        return None
    return node.attributes.get_int("axis", 1) % ndim


def deq_scales(x_scale: ir.Value, w_scale: np.ndarray, bias_scale: ir.Value | None) -> np.ndarray:
    """float32 s_x·s_w per output channel (the bias DQ scale when there is one: what quantize used)."""
    if bias_scale is not None and const(bias_scale) is not None:
        return const(bias_scale).astype(np.float32).reshape(-1)
    return (np.float32(const(x_scale).reshape(())) * w_scale.astype(np.float32)).astype(np.float32).reshape(-1)


def deq_matches_bias(x_scale, w_scale, b_scale) -> bool:
    expected = (np.float32(const(x_scale).reshape(())) * w_scale.astype(np.float32)).reshape(-1)
    got = const(b_scale)
    if got is None:
        return False
    got = got.astype(np.float32).reshape(-1)
    if expected.size == 1 and got.size > 1:
        expected = np.full(got.shape, expected[0], np.float32)
    return got.shape == expected.shape and np.allclose(got, expected, rtol=1e-6, atol=0)


def dequantized_bias(node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value | None] | None:
    """(int32 values, scale, zero point) of the DequantizeLinear feeding `node`'s bias input, if any."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    dq = b.producer() if b is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    return dq.inputs[0], dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None


def bias_add(mm: ir.Value, n: int) -> tuple[ir.Node, np.ndarray] | None:
    """The Add that adds a constant per-output-channel bias to the MatMul output `mm` (its only
    consumer), with that bias; None when there is none."""
    uses = mm.uses()
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    bias = const(add.inputs[1 - uses[0].idx])
    if bias is None or bias.size not in (1, n) or (bias.ndim > 1 and int(np.prod(bias.shape[:-1])) != 1):
        return None
    return add, bias


def int32_bias(bias: np.ndarray, deq: np.ndarray, n: int):
    return formulas.bias_to_int32(np.broadcast_to(bias.reshape(-1), (n,)), deq)
