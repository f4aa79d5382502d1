"""Rewrites of the QDQ graph into the forms onnxruntime CPU runs fast, or runs at all.

* Blocked int4/int8 weight DequantizeLinear → MatMul becomes one com.microsoft
  MatMulNBits (onnxruntime's weight-only kernel; its packed layout: qcompile.packing), and
  so does a weight-only layer's per-channel (or per-tensor) int8 weight, its scale repeated
  over blocks of 32. onnxruntime's optimizer would fuse the DQ→MatMul itself at load time —
  with int8 compute (its default `session.qdq_matmulnbits_accuracy_level` is 4), which
  quantizes a weight-only layer's activations; writing the node makes the shipped graph the
  kernel, picks its accuracy level (0 = float compute for weight-only layers; 4 = int8, for
  layers whose input is already int8-quantized or whose scheme quantizes it per group), and
  saves that work at every load.
* FP8 and int4 QuantizeLinear→DequantizeLinear on an activation become float
  arithmetic with the same numbers (Cast to FP8 and back; Round/Clip for int4):
  onnxruntime 1.31's optimizer otherwise fuses FP8 QDQ into MatMulIntegerToFloat, which
  rejects FP8 inputs, and its Clip→QuantizeLinear fusion throws on 4-bit zero points —
  either way the model fails to load. Neither has a CPU kernel: both are simulations.

Each function keeps the replaced node's name on the new one so the report's per-layer
records still find their kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.numerics import FLOAT8_TYPES
from qcompile.packing import matmulnbits_pack
from qcompile.qdq import add_initializer, take_over

from .kernel_match import bias_reader, take_over_layer

_NBITS = {ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False),
          ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False)}
_FLOAT8 = {spec[2] for spec in FLOAT8_TYPES.values()}
_INT4 = {ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15)}


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


PER_CHANNEL_BLOCK = 32   # the block a per-channel weight's repeated scale is written in


def matmulnbits_candidate(matmul: ir.Node, *, per_channel: bool = False) -> tuple[ir.Node, str | None]:
    """(the weight's DequantizeLinear, why it cannot become MatMulNBits or None); with
    `per_channel`, an unblocked weight (one scale per output channel, or one) qualifies too."""
    dq = matmul.inputs[1].producer() if len(matmul.inputs) > 1 and matmul.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return dq, "weight is not dequantized"
    block = dq.attributes.get_int("block_size", 0)
    q = dq.inputs[0]
    if q.const_value is None or q.dtype not in _NBITS or q.shape is None or len(q.shape) != 2:
        return dq, "weight is not a constant 2-D int4/int8 tensor"
    if not block:
        scale = _const(dq.inputs[1])
        n = q.shape[1]
        if not per_channel or scale is None or scale.size not in (1, n) or \
                (scale.size == n > 1 and dq.attributes.get_int("axis", 1) % 2 != 1):
            return dq, "weight is not blocked (per-group)"
        if len(dq.outputs[0].uses()) != 1:
            return dq, "weight shared with other nodes"
        return dq, None
    if dq.attributes.get_int("axis", 1) % 2 != 0:
        return dq, "weight blocks do not run along K (axis 0)"
    if block < 16 or block & (block - 1):
        return dq, f"MatMulNBits needs a power-of-two block size >= 16, got {block}"
    if len(dq.outputs[0].uses()) != 1:
        return dq, "weight shared with other nodes"
    return dq, None


def weight_bits(dq: ir.Node) -> int:
    """4 or 8: the bits of the weight a MatMulNBits candidate's DequantizeLinear reads."""
    return _NBITS[dq.inputs[0].dtype][0]


def to_matmulnbits(graph: ir.Graph, matmul: ir.Node, dq: ir.Node, accuracy_level: int) -> ir.Node:
    """Replace DequantizeLinear(blocked weight) → MatMul by MatMulNBits (same name, same output)."""
    q_val = dq.inputs[0]
    nbits, signed = _NBITS[q_val.dtype]
    q = np.asarray(q_val.const_value.numpy()).astype(np.int16)
    scale = _const(dq.inputs[1]).astype(np.float32)
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    zp = None if zp is None or (signed and not np.any(np.asarray(zp).astype(np.int16))) else \
        np.asarray(zp).astype(np.int16)
    block = dq.attributes.get_int("block_size", 0)
    if not block:   # per channel (or per tensor): the same scale for every block of K
        block = PER_CHANNEL_BLOCK
        blocks = -(-q.shape[0] // block)
        scale = np.broadcast_to(scale.reshape(1, -1), (blocks, q.shape[1])).copy()
        if zp is not None:
            zp = np.broadcast_to(zp.reshape(1, -1), (blocks, q.shape[1])).copy()
    packed = matmulnbits_pack(q, scale, zp, bits=nbits, block_size=block, signed=signed)
    base = q_val.name.removesuffix("_quantized")
    inputs = [matmul.inputs[0], add_initializer(graph, f"{base}_nbits", packed["B"]),
              add_initializer(graph, f"{base}_nbits_scales", packed["scales"])]
    if packed["zero_points"] is not None:
        inputs.append(add_initializer(graph, f"{base}_nbits_zero_points", packed["zero_points"]))
    node = ir.node("MatMulNBits", inputs, {"K": packed["K"], "N": packed["N"], "bits": nbits,
                                           "block_size": packed["block_size"],
                                           "accuracy_level": int(accuracy_level)},
                   domain="com.microsoft", name=matmul.name)
    old = matmul.outputs[0]
    new = node.outputs[0]
    new.dtype, new.shape = old.dtype, old.shape
    graph.insert_before(matmul, node)
    take_over(graph, old, new, [matmul, dq])
    return node


def simulated_qdq(graph: ir.Graph, q: ir.Node) -> str | None:
    """Rewrite an FP8 or int4 activation QuantizeLinear and the DequantizeLinears reading it
    into float arithmetic with the same result; returns "float8"/"int4", or None if untouched.

    FP8: Div → Cast(FP8, saturate) → Cast(float) → Mul. int4: Div → Round → Add(zp) →
    Clip(qmin, qmax) → Sub(zp) → Mul (onnxruntime 1.31's Clip/ReLU→QuantizeLinear fusion
    throws on 4-bit zero points, and no int4 activation kernel exists anyway).
    """
    q_out = q.outputs[0]
    kind = "float8" if q_out.dtype in _FLOAT8 else "int4" if q_out.dtype in _INT4 else None
    if kind is None or len(q.inputs) < 2 or _const(q.inputs[1]) is None or _const(q.inputs[1]).size != 1:
        return None
    dqs = [u.node for u in q_out.uses()]
    if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q_out in graph.outputs:
        return None
    x, scale = q.inputs[0], q.inputs[1]
    f = ir.DataType.FLOAT
    steps: list[tuple[str, list, dict, ir.DataType]] = [("Div", [x, scale], {}, f)]
    if kind == "float8":
        steps += [("Cast", [], {"to": q_out.dtype, "saturate": 1}, q_out.dtype), ("Cast", [], {"to": f}, f)]
    else:
        zp = float(np.asarray(_const(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else 0)
                   .astype(np.float32))
        lo, hi = _INT4[q_out.dtype]
        c = {k: add_initializer(graph, f"{q.name}_sim_{k}", np.float32(v))
             for k, v in (("zp", zp), ("lo", lo), ("hi", hi))}
        steps += [("Round", [], {}, f), ("Add", [None, c["zp"]], {}, f),
                  ("Clip", [None, c["lo"], c["hi"]], {}, f), ("Sub", [None, c["zp"]], {}, f)]
    steps.append(("Mul", [None, scale], {}, f))
    nodes, prev = [], None
    for i, (op, inputs, attrs, dtype) in enumerate(steps):
        inputs = inputs or [None]
        inputs = [prev if v is None else v for v in inputs]
        node = ir.node(op, inputs, attrs, name=f"{q.name}_sim{i}_{op}")
        node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = node.name, dtype, x.shape
        nodes.append(node)
        prev = node.outputs[0]
    graph.insert_before(q, nodes)
    for d in dqs:
        for i, out in enumerate(graph.outputs):
            if out is d.outputs[0]:
                graph.outputs[i] = prev
                name = out.name
                out.name = f"{name}_replaced"
                prev.name = name
        d.outputs[0].replace_all_uses_with(prev)
        graph.remove(d, safe=True)
    graph.remove(q, safe=True)
    return kind


def _dq_parts(value: ir.Value):
    """(quantized input, scale array, zero point array, axis) of a DequantizeLinear producing `value`."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.attributes.get_int("block_size", 0):
        return None
    scale = _const(dq.inputs[1])
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if scale is None:
        return None
    return dq.inputs[0], scale, zp, dq.attributes.get_int("axis", 1)


def integer_matmul_candidate(matmul: ir.Node) -> bool:
    """A static-int8 MatMul with no output Q: DQ(Q(x)) per tensor × DQ(int8 const W) per column."""
    if matmul.op_type != "MatMul" or len(matmul.inputs) != 2:
        return False
    x, w = _dq_parts(matmul.inputs[0]), _dq_parts(matmul.inputs[1])
    if x is None or w is None:
        return False
    xq, xs, xz, _ = x
    wq, ws, wz, waxis = w
    if xq.producer() is None or xq.producer().op_type != "QuantizeLinear" or xs.size != 1:
        return False
    if xq.dtype not in (ir.DataType.UINT8, ir.DataType.INT8) or wq.dtype != ir.DataType.INT8:
        return False
    if wq.const_value is None or len(wq.const_value.shape) != 2:
        return False
    if wz is not None and np.any(np.asarray(wz).astype(np.int64)):
        return False
    if ws.size != 1 and waxis % 2 != 1:
        return False  # per-channel scales must run along N
    return not any(u.node.op_type == "QuantizeLinear" for u in matmul.outputs[0].uses())


def to_matmul_integer_to_float(graph: ir.Graph, matmul: ir.Node) -> ir.Value:
    """DQ(x)·DQ(W) [+ bias] → one com.microsoft MatMulIntegerToFloat(q_x, q_W, s_x, s_W, zp_x, -, bias):
    onnxruntime's int8 GEMM with the rescale and the bias in its output stage.

    Written here because onnxruntime 1.31 builds no int8 kernel for this layer itself: for a
    MatMul followed by a bias Add and no output Q it first rewrites MatMul+Add into a Gemm behind
    Reshapes and then fuses nothing (MiniLM: 18 of 36 linears ran DequantizeLinear + float Gemm),
    and its MatMulIntegerToFloatFusion only fires when s_x·s_W is a Mul node, which constant
    folding removes for a static scale (the MatMulInteger → Cast → Mul form this pass wrote before
    ran as three ops: on MiniLM at batch 16 the Cast and Mul took 18 of 93 ms). The bias of a
    following Add, or of the BiasGelu `fuse` writes (which becomes a Gelu), moves into the node.
    Returns the value holding the layer's result (kernel_match.take_over_layer)."""
    xq, _, xz, _ = _dq_parts(matmul.inputs[0])
    wq, ws, _, _ = _dq_parts(matmul.inputs[1])
    base = matmul.name
    n = wq.const_value.shape[1]
    old = matmul.outputs[0]
    x_dq, w_dq = matmul.inputs[0].producer(), matmul.inputs[1].producer()
    w_scale = w_dq.inputs[1] if ws.ndim <= 1 else add_initializer(graph, f"{base}_w_scale", ws.reshape(-1))
    inputs = [xq, wq, x_dq.inputs[1], w_scale, None, None]
    if xz is not None:
        inputs[4] = add_initializer(graph, f"{base}_x_zero_point", np.asarray(xz).reshape(()))
    remove, bias_gelu = [matmul], None
    reader = bias_reader(old, n)
    if reader is not None:
        inputs.append(reader[1])
        if reader[0].op_type == "Add":
            remove.append(reader[0])
            old = reader[0].outputs[0]
        else:
            bias_gelu = reader[0]
    while inputs[-1] is None:
        inputs.pop()
    node = ir.node("MatMulIntegerToFloat", inputs, domain="com.microsoft", name=base)
    node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, old.shape
    graph.insert_before(matmul, node)
    return take_over_layer(graph, old, node.outputs[0], remove[::-1], bias_gelu)
