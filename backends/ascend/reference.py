"""Reference lowering: the Ascend deploy graph rewritten into standard ONNX that onnxruntime
runs, so verification checks the graph that ships (compile.py runs this instead of
model.onnx when a lowering sets `ctx.reference_model`).

Each Ascend operator and each int8 layer becomes standard operators with the same
arithmetic (see `formulas.py`):

* AscendQuant(x)      -> x rounded to fp16 -> Mul(scale) [-> Mul(scale): sqrt_mode] [-> Add(offset)],
                         each result rounded to fp16 (float32 op + Cast to fp16 and back: correctly
                         rounded, unlike onnxruntime's own fp16 Mul) -> Round | Floor | Ceil |
                         Trunc(= Where(v < 0, Ceil, Floor)) -> Clip(-128, 127) -> Cast(int8)
                         (no fp16 rounding when the descriptor's quant_compute_dtype is float32)
* AscendDequant(x, d) -> Cast(x, float) -> Mul(float32 unpacked from the uint64 deq_scale, along
                         NCHW's C) [-> Mul again: sqrt_mode] [-> Relu: relu_flag] [-> Cast(fp16): dtype 1]
* AscendAntiQuant(x)  -> Cast(x, float) [-> Add(offset)] -> Mul(scale) [-> Mul(scale)] -> Cast(fp16),
                         fp16 rounding after each step (fp16 output)
* int8 Conv           -> ConvInteger [+ Add(int32 bias along C)]
* int8 Gemm / MatMul  -> MatMulInteger (transB applied to the constant) [+ Add(int32 bias)]

The integer layers run exactly (int32 accumulation), so the only differences from the device
are what the formulas do not model (see docs/ascend.md).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from . import formulas
from .qdq_form import const, unique_init_name
from .rules import OPTIONS, LoweringOptions

ASCEND_OPS = ("AscendQuant", "AscendDequant", "AscendAntiQuant", "AscendRequant", "AscendRequantS16",
              "AscendDequantS16")


def _init(op, node: ir.Node, array: np.ndarray, base: str) -> ir.Value:
    """A fresh initializer for a rewrite of `node` (bases are distinct within one rewrite; the
    rewriter registers them after it, before the next)."""
    name = unique_init_name(node.graph, base)
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class RefIntConv(RewriteRuleClassBase):
    """Conv on int8 input and int8 weights -> ConvInteger (+ int32 bias along C)."""

    def pattern(self, op, q, w):
        return op.Conv(q, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, q, w, y, **_) -> MatchResult:
        result = MatchResult()
        if q.dtype != ir.DataType.INT8 or w.dtype != ir.DataType.INT8 or const(w) is None:
            return result.fail("not an int8 Conv")
        node = y.producer()
        if len(node.inputs) > 2 and node.inputs[2] is not None and const(node.inputs[2]) is None:
            return result.fail("bias is not constant")
        return result

    def rewrite(self, op, q, w, y, **_):
        node = y.producer()
        acc = op.ConvInteger(q, w, **dict(node.attributes))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const(node.inputs[2]).astype(np.int32).reshape(-1)
            spatial = const(w).ndim - 2
            acc = op.Add(acc, _init(op, node, b.reshape([b.size] + [1] * spatial), f"{node.inputs[2].name}_ref"))
        return acc


class RefIntGemm(RewriteRuleClassBase):
    """Gemm on int8 A and int8 constant B (+ int32 C) -> MatMulInteger (+ Add)."""

    def pattern(self, op, q, w):
        return op.Gemm(q, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, q, w, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        if q.dtype != ir.DataType.INT8 or w.dtype != ir.DataType.INT8 or const(w) is None:
            return result.fail("not an int8 Gemm")
        a = node.attributes
        if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
            return result.fail("transA/alpha/beta")
        return result

    def rewrite(self, op, q, w, y, **_):
        node = y.producer()
        wv = w
        if node.attributes.get_int("transB", 0):
            wv = _init(op, node, np.ascontiguousarray(const(w).T), f"{w.name}_ref_t")
        acc = op.MatMulInteger(q, wv)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            acc = op.Add(acc, node.inputs[2])
        return acc


class RefIntMatMul(RewriteRuleClassBase):
    """MatMul of int8 activations by an int8 constant -> MatMulInteger."""

    def pattern(self, op, q, w):
        return op.MatMul(q, w, _outputs=["y"])

    def check(self, context, q, w, y, **_) -> MatchResult:
        result = MatchResult()
        if q.dtype != ir.DataType.INT8 or w.dtype != ir.DataType.INT8:
            return result.fail("not an int8 MatMul")
        return result

    def rewrite(self, op, q, w, y, **_):
        return op.MatMulInteger(q, w)


class RefDequant(RewriteRuleClassBase):
    """AscendDequant -> Cast(float) -> Mul(float32 unpacked from deq_scale along NCHW's C)."""

    def pattern(self, op, x, deq):
        return op.AscendDequant(x, deq, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, deq, y, **_) -> MatchResult:
        result = MatchResult()
        d = const(deq)
        if d is None or deq.dtype != ir.DataType.UINT64:
            return result.fail("deq_scale is not a constant uint64")
        try:
            f = formulas.unpack_deq_scale(d)
        except ValueError as err:
            return result.fail(str(err))
        if f.size > 1 and (x.shape is None or len(x.shape) < 2):
            return result.fail("per-channel deq_scale on an input of unknown rank")
        return result

    def rewrite(self, op, x, deq, y, **_):
        node = y.producer()
        f = formulas.unpack_deq_scale(const(deq))
        if f.size > 1:
            shape = [1] * len(x.shape)
            shape[1] = f.size
            f = f.reshape(shape)
        else:
            f = f.reshape(())
        scale = _init(op, node, f.astype(np.float32), f"{deq.name}_unpacked")
        out = op.Mul(op.Cast(x, to=ir.DataType.FLOAT), scale)
        if _attr(node, "sqrt_mode", 0):
            out = op.Mul(out, scale)
        if _attr(node, "relu_flag", 0):
            out = op.Relu(out)
        if _attr(node, "dtype", 0) == 1:
            out = op.Cast(out, to=ir.DataType.FLOAT16)
        return out


class RefQuant(RewriteRuleClassBase):
    """AscendQuant -> the float16 (or float32) arithmetic, rounding mode, saturation, int8."""

    def pattern(self, op, x):
        return op.AscendQuant(x, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        mode = _attr(node, "round_mode", "Round")
        if mode not in formulas.ROUND_MODES:
            return result.fail(f"round_mode {mode!r}")
        dst = node.attributes.get("dst_type")
        if dst is not None and dst.value not in (2, "INT8", "int8"):
            return result.fail(f"dst_type {dst.value!r} (only int8 is modelled)")
        return result

    def rewrite(self, op, x, y, **_):
        node = y.producer()
        fp16 = node.graph.meta[OPTIONS].compute_dtype == "float16"
        base = f"{node.name or 'AscendQuant'}_ref"
        scale = float(_attr(node, "scale", 1.0))
        offset = float(_attr(node, "offset", 0.0))
        # float16 arithmetic, correctly rounded: each step in float32 (exact for a product of two
        # float16 values) then rounded to float16 by a Cast (onnxruntime's own float16 Mul is not
        # correctly rounded, so it is not used)
        r16 = (lambda v: op.Cast(op.Cast(v, to=ir.DataType.FLOAT16), to=ir.DataType.FLOAT)) if fp16 else (lambda v: v)
        as_dt = (lambda c: float(np.float16(c))) if fp16 else (lambda c: float(np.float32(c)))
        v = r16(op.Cast(x, to=ir.DataType.FLOAT))
        s = _init(op, node, np.asarray(as_dt(scale), np.float32), f"{base}_scale")
        v = r16(op.Mul(v, s))
        if _attr(node, "sqrt_mode", 0):
            v = r16(op.Mul(v, s))
        if offset:
            v = r16(op.Add(v, _init(op, node, np.asarray(as_dt(offset), np.float32), f"{base}_offset")))
        mode = _attr(node, "round_mode", "Round")
        if mode == "Round":
            v = op.Round(v)
        elif mode == "Floor":
            v = op.Floor(v)
        elif mode == "Ceil":
            v = op.Ceil(v)
        else:  # Trunc: toward zero
            zero = _init(op, node, np.asarray(0, np.float32), f"{base}_zero")
            v = op.Where(op.Less(v, zero), op.Ceil(v), op.Floor(v))
        v = op.Clip(v, _init(op, node, np.asarray(formulas.INT8_MIN, np.float32), f"{base}_min"),
                    _init(op, node, np.asarray(formulas.INT8_MAX, np.float32), f"{base}_max"))
        return op.Cast(v, to=ir.DataType.INT8)


class RefAntiQuant(RewriteRuleClassBase):
    """AscendAntiQuant -> Cast(fp16) [-> Add(offset)] -> Mul(scale) [-> Mul(scale)] (fp16 output)."""

    def pattern(self, op, x):
        return op.AscendAntiQuant(x, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, y, **_) -> MatchResult:
        return MatchResult()

    def rewrite(self, op, x, y, **_):
        node = y.producer()
        base = f"{node.name or 'AscendAntiQuant'}_ref"
        scale = float(np.float16(_attr(node, "scale", 1.0)))
        offset = float(np.float16(_attr(node, "offset", 0.0)))
        r16 = lambda v: op.Cast(op.Cast(v, to=ir.DataType.FLOAT16), to=ir.DataType.FLOAT)  # noqa: E731
        v = op.Cast(x, to=ir.DataType.FLOAT)  # int8 -> float: exact (and exact in float16)
        if offset:
            v = r16(op.Add(v, _init(op, node, np.asarray(offset, np.float32), f"{base}_offset")))
        s = _init(op, node, np.asarray(scale, np.float32), f"{base}_scale")
        v = op.Mul(v, s)
        if _attr(node, "sqrt_mode", 0):
            v = op.Mul(r16(v), s)
        return op.Cast(v, to=ir.DataType.FLOAT16)


# Applied in order: the int8 layers while their inputs are still the Ascend ops' int8 outputs,
# then the Ascend ops themselves.
REFERENCE_RULE_SETS = (
    RewriteRuleSet([RefIntConv.rule(), RefIntGemm.rule(), RefIntMatMul.rule()]),
    RewriteRuleSet([RefDequant.rule(), RefQuant.rule(), RefAntiQuant.rule()]),
)


def lower_to_reference(model: ir.Model, compute_dtype: str = "float16") -> ir.Model:
    """Rewrite `model` in place into standard ONNX; raises if an Ascend op is left."""
    model.graph.meta[OPTIONS] = LoweringOptions(compute_dtype=compute_dtype)
    for rules in REFERENCE_RULE_SETS:
        rules.apply_to_model(model)
    common_passes.RemoveUnusedNodesPass()(model)
    model.graph.sort()
    left = sorted({n.op_type for n in model.graph if n.op_type in ASCEND_OPS}
                  | {f"int8 {n.op_type}" for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")
                     and n.inputs[0] is not None and n.inputs[0].dtype == ir.DataType.INT8})
    if left:
        raise RuntimeError(f"reference lowering left {', '.join(left)} in the graph")
    return model


def reference_model(deploy: ir.Model, compute_dtype: str = "float16") -> ir.Model:
    """An onnxruntime-runnable copy of the deploy graph (tensors shared, graph cloned)."""
    return lower_to_reference(deploy.clone(), compute_dtype)
