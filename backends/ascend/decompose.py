"""Decompositions the down-conversion to ATC's opset needs: operators born after it (onnx's
version converter cannot take them down) rewritten into primitives every opset has.

* LayerNormalization (opset 17) -> ReduceMean/Sub/Mul/Add/Sqrt/Div;
* Gelu (opset 20) -> the Erf form (approximate='none') or the Tanh form (approximate='tanh').
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from .qdq_form import unique_init_name

# op -> the opset it was born in; decomposed when converting below that opset
DECOMPOSED_OPS = {"LayerNormalization": 17, "Gelu": 20}


def _scalar(op, graph: ir.Graph, value: float, base: str) -> ir.Value:
    name = unique_init_name(graph, base)
    return op.initializer(ir.tensor(np.asarray(value, dtype=np.float32), name=name), name=name)


class DecomposeLayerNorm(RewriteRuleClassBase):
    """LayerNormalization (opset 17) -> ReduceMean/Sub/Mul/Add/Sqrt/Div (opset 13..17 forms)."""

    def pattern(self, op, x, scale):
        return op.LayerNormalization(x, scale, _allow_other_inputs=True, _allow_other_attributes=True,
                                     _outputs=["y"])

    def check(self, context, x, scale, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail("Mean/InvStdDev outputs are used")
        if x.shape is None:
            return result.fail("input rank unknown")
        if x.dtype not in (None, ir.DataType.FLOAT):
            return result.fail("only float32 LayerNormalization is decomposed")
        return result

    def rewrite(self, op, x, scale, y, **_):
        node = y.producer()
        rank = len(x.shape)
        axis = node.attributes.get_int("axis", -1) % rank
        eps = node.attributes.get_float("epsilon", 1e-5)
        axes = list(range(axis, rank))
        base = node.name or "LayerNormalization"
        mean = op.ReduceMean(x, axes=axes, keepdims=1)
        d = op.Sub(x, mean)
        var = op.ReduceMean(op.Mul(d, d), axes=axes, keepdims=1)
        std = op.Sqrt(op.Add(var, _scalar(op, node.graph, eps, f"{base}_epsilon")))
        out = op.Mul(op.Div(d, std), scale)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            out = op.Add(out, bias)
        return out


class DecomposeGelu(RewriteRuleClassBase):
    """Gelu (opset 20) -> Erf form (approximate='none') or Tanh form (approximate='tanh')."""

    def pattern(self, op, x):
        return op.Gelu(x, _allow_other_attributes=True, _outputs=["y"])

    def rewrite(self, op, x, y, **_):
        node = y.producer()
        graph = node.graph
        base = node.name or "Gelu"
        approx = node.attributes.get_string("approximate", "none")
        # distinct bases within one rewrite: the rewriter registers the initializers after it
        half = _scalar(op, graph, 0.5, f"{base}_half")
        one = _scalar(op, graph, 1.0, f"{base}_one")
        if approx == "tanh":
            c = _scalar(op, graph, math.sqrt(2.0 / math.pi), f"{base}_sqrt_2_over_pi")
            k = _scalar(op, graph, 0.044715, f"{base}_k")
            inner = op.Mul(c, op.Add(x, op.Mul(k, op.Mul(x, op.Mul(x, x)))))
            t = op.Tanh(inner)
        else:
            t = op.Erf(op.Div(x, _scalar(op, graph, math.sqrt(2.0), f"{base}_sqrt2")))
        return op.Mul(op.Mul(half, x), op.Add(one, t))


_RULES = {"LayerNormalization": DecomposeLayerNorm.rule(), "Gelu": DecomposeGelu.rule()}


def decomposition_rules(below_opset: int) -> RewriteRuleSet | None:
    """The rules decomposing the ops of DECOMPOSED_OPS that do not exist at `below_opset`."""
    rules = [_RULES[op] for op, born in DECOMPOSED_OPS.items() if born > below_opset]
    return RewriteRuleSet(rules) if rules else None
