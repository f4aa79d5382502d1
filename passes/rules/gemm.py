"""Gemm → MatMul + Add, for graphs whose later passes want one matrix-product form.

onnxscript's own `gemm_to_matmul_add_rule` only matches Reshape→Gemm→Reshape; this
rule takes a plain Gemm with alpha = beta = 1 and no transA. A transposed constant
B is stored transposed, so no Transpose node is left behind.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult


class GemmToMatMulAdd(RewriteRuleClassBase):
    def pattern(self, op, a, b, c):
        return op.Gemm(a, b, c, _allow_other_attributes=True, _outputs=["gemm_out"])

    def check(self, context, a, b, c, gemm_out, **_) -> MatchResult:
        result = MatchResult()
        attrs = gemm_out.producer().attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return result.fail("alpha/beta != 1")
        if attrs.get_int("transA", 0):
            return result.fail("transA")
        if attrs.get_int("transB", 0) and b.const_value is None:
            return result.fail("transB on a non-constant B")
        return result

    def rewrite(self, op, a, b, c, gemm_out, **_):
        if gemm_out.producer().attributes.get_int("transB", 0):
            w = np.ascontiguousarray(b.const_value.numpy().T)
            b = op.initializer(ir.tensor(w, name=f"{b.name}_transposed"), name=f"{b.name}_transposed")
        return op.Add(op.MatMul(a, b), c)


gemm_to_matmul_add_rule = GemmToMatMulAdd.rule()
rules = RewriteRuleSet([gemm_to_matmul_add_rule])
