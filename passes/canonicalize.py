"""canonicalize: put the exported graph into the one form later passes expect."""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
from onnxscript import rewriter
from onnxscript.rewriter.rules import common as common_rules

from qcompile.facts import Fact
from qcompile.graph_signature import signature
from qcompile.model_io import infer_shapes
from qcompile.registry import QPass, register_pass

from .rules import conv_affine_bias
from .rules import gemm as gemm_rules

_GEMM_RULES = {
    "keep": (),
    "to_matmul_add": (gemm_rules.gemm_to_matmul_add_rule,),
    "from_matmul_add": (common_rules.matmul_add_to_gemm_rule, common_rules.transpose_b_matmul_add_to_gemm_rule),
}


@register_pass("canonicalize")
class Canonicalize(QPass):
    """Constant folding, dead-node removal, BatchNorm/HardSwish fusion, Gemm/MatMul form, names."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        fold_constants: bool = True
        fuse_batchnorm: bool = True
        # x*relu6(x+3)/6 and HardSigmoid*x spelled out by exporters -> one HardSwish op
        fuse_hardswish: bool = True
        # Conv -> Mul(c) -> Add(d): d/c into the Conv bias (passes/rules/conv_affine_bias.py)
        fold_affine_bias: bool = True
        # Gemm/MatMul normal form: keep what the exporter wrote, or rewrite one into the other.
        gemm: Literal["keep", "to_matmul_add", "from_matmul_add"] = "keep"

    GIVES = frozenset({Fact.CANONICAL})

    def run(self, model: ir.Model) -> bool:
        start = signature(model)
        before = model.graph.num_nodes()
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        names_before = _names_by_input(model)  # before onnxscript's optimizer fuses anything
        if self.config.fold_constants:
            # onnxscript's optimizer: constant folding, dead-node removal, no-op rules.
            try:
                onnxscript.optimizer.optimize(model, num_iterations=2, onnx_shape_inference=False)
            except Exception as err:  # noqa: BLE001 - its folding fails on some ops (SplitToSequence): go on unfolded
                self.ctx.warn(f"canonicalize: onnxscript's constant folding failed ({str(err).splitlines()[0][:120]});"
                              " the graph is left unfolded")
        rules = list(_GEMM_RULES[self.config.gemm])
        if self.config.fuse_batchnorm:
            rules += [common_rules.fuse_batchnorm_into_conv_rule,
                      common_rules.fuse_batchnorm_into_conv_transpose_rule,
                      common_rules.fuse_batchnorm_into_gemm_rule]
        if self.config.fuse_hardswish:
            rules += common_rules.fuse_hardswish_rules().rules
        fired = rewriter.RewriteRuleSet(rules).apply_to_model(model) if rules else 0
        if self.config.fold_affine_bias:   # after BatchNorm fusion: it sees the Conv that BN folded into
            fired = (fired or 0) + conv_affine_bias.fold_affine_bias(model)
        common_passes.RemoveUnusedNodesPass()(model)
        _restore_names(model, names_before)
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common_passes.NameFixPass()(model)
        infer_shapes(model)
        after = model.graph.num_nodes()
        self.ctx.reports["canonicalize"] = {"nodes_before": before, "nodes_after": after,
                                            "rewrites": int(fired or 0)}
        return signature(model) != start


def _names_by_input(model: ir.Model) -> dict[tuple[str, str], str]:
    """(op type, first input name) -> node name, to re-find a node a fusion rebuilt."""
    return {(n.op_type, n.inputs[0].name): n.name for n in model.graph
            if n.name and n.inputs and n.inputs[0] is not None}


def _restore_names(model: ir.Model, before: dict[tuple[str, str], str]) -> None:
    """Give a node rebuilt by a fusion (Conv+BatchNorm -> Conv) its exporter name back,
    so recipe scopes written against the exported names keep matching."""
    known = set(before.values())
    taken = {n.name for n in model.graph if n.name}
    for node in model.graph:
        if node.name in known or not node.inputs or node.inputs[0] is None:
            continue  # an original node (new ones are unnamed or named node_<Op>_<n>)
        old = before.get((node.op_type, node.inputs[0].name))
        if old and old not in taken:
            node.name = old
            taken.add(old)
