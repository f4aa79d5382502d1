"""fuse: LayerNorm/RMSNorm/GELU/rotary/attention fusion with onnxscript's rewrite rules.

The rules are onnxscript's (passes/rules/fusions.py lists them in order). What this pass
adds is what makes them fire on real exports and stay honest:

* spelling first: onnxruntime's symbolic shape inference, then `reshape_copy_dims`,
  `static_dims`, `bias_last`, `positive_slice_axes`, `explicit_defaults` and `reciprocal`
  (passes/rules/spelling.py): TorchScript exports hide head shapes and split points behind
  Shape arithmetic, write biases first and rsqrt as Div(1, .), and onnxscript's patterns
  match dims, axes, ops and default attributes literally;
* activation Q/DQ pairs are lifted out while the rules run and put back afterwards
  (passes/rules/qdq_see_through.py), so fusing after `quantize` fuses the same subgraphs;
* the report counts every step's rewrites, and for each Softmax left outside a fused
  attention it records why onnxscript's SDPA rule did not take it (its matching tracer);
* only the groups the target runs (`fusions` in its descriptor) are applied: Ascend's ATC
  takes no com.microsoft operators;
* afterwards the shape arithmetic every layer repeats is merged into one copy
  (passes/rules/shared_shapes.py, `share_shapes`), which a decode step feels;
* a graph with nothing any group could fuse (a CNN) is left as it is.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
from onnxscript.rewriter import MatchingTracer, MatchStatus

from qcompile.errors import RecipeError
from qcompile.facts import Fact
from qcompile.graph_signature import signature
from qcompile.model_io import infer_shapes, infer_symbolic_shapes
from qcompile.registry import QPass, register_pass

from .rules import fusions, qdq_see_through, shared_shapes, skip_norm_order, spelling

_ATTENTION_TRACED = ("sdpa",)  # the step whose tracer explains an unfused attention


@register_pass("fuse")
class Fuse(QPass):
    """Transformer fusions (onnxscript rules), seeing through Q/DQ, with a per-rule report."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        # groups of passes/rules/fusions.py, applied in that file's order; `attention_packed`
        # (one com.microsoft Attention with packed QKV weights) is opt-in: it turns the Q/K/V
        # projections into a weight input a later `quantize` cannot see as MatMuls
        rules: tuple[str, ...] = fusions.DEFAULT_GROUPS
        # explain attention-shaped subgraphs (Softmax) that did not fuse, with the rule's reason
        explain: bool = True
        # read each repeated shape from one Shape node and merge the arithmetic the layers repeat
        # on it (passes/rules/shared_shapes.py)
        share_shapes: bool = True

        def validate(self):
            unknown = [g for g in self.rules if g not in fusions.GROUPS]
            if unknown:
                return "rules", f"unknown fusion group(s) {unknown}; known: {', '.join(fusions.GROUPS)}"
            return None

    GIVES = frozenset({Fact.FUSED})

    @classmethod
    def min_opset(cls, config, target=None, model=None) -> int:
        """onnxscript's patterns spell ReduceMean/Slice as opset 18 does (axes as inputs); a
        target that runs none of the groups (Ascend: ATC parses opset <= 16), or a model with
        nothing any of them could fuse (a CNN), needs nothing."""
        runs = set(target.setting("fusions") or ()) if target is not None else set(config.rules)
        if not runs & set(config.rules):
            return 0
        return 18 if model is None or fusion_candidates(model) else 0

    def run(self, model: ir.Model) -> bool:
        allowed = self._allowed_groups()
        groups = [g for g in self.config.rules if g in allowed]
        report = {"rules": {}, "groups": groups,
                  "not_run": {g: f"target {self.ctx.target.name} does not run "
                                 f"{', '.join(fusions.PRODUCES[g])} (its descriptor's `fusions`)"
                              for g in self.config.rules if g not in allowed}}
        self.ctx.reports["fuse"] = report
        if not groups:
            return False
        if not fusion_candidates(model):   # a CNN: leave its graph as it is (no spelling rules either)
            report["nothing_to_fuse"] = True
            return False
        before = signature(model)
        graph = model.graph
        nodes_before = {id(n) for n in graph}
        lifted = qdq_see_through.lift(graph)
        report["symbolic_shapes"] = infer_symbolic_shapes(model)
        if not report["symbolic_shapes"]:
            self.ctx.warn("fuse: onnxruntime's symbolic shape inference failed on this graph; "
                          "attention rules that check dimensions may not fire")
        for rule in spelling.RULES:
            report["rules"][rule.__name__] = rule(graph)
        if report["rules"]["static_dims"]:  # the shape arithmetic they fed becomes constants
            onnxscript.optimizer.fold_constants(model, onnx_shape_inference=False)
        if report["rules"]["reshape_copy_dims"]:
            infer_symbolic_shapes(model)
        for step in fusions.STEPS:
            if step.group not in groups:
                continue
            count = step.rules.apply_to_model(model)
            report["rules"][step.name] = int(count)
            if count and step.infer_shapes_after:
                common_passes.ShapeInferencePass(strict_mode=False)(model)
        report["rules"]["skip_norm_full_input_first"] = skip_norm_order.full_input_first(graph)
        dropped = qdq_see_through.restore(graph, lifted, nodes_before)
        self._mark_fused_layers(graph)
        if lifted:
            report["qdq"] = {"lifted": len(lifted), "dropped_inside_fused_ops": dropped}
            if dropped:
                self.ctx.warn(f"fuse: {len(dropped)} activation Q/DQ pair(s) ended up inside fused operators "
                              f"(computed in float there): {', '.join(dropped[:4])}"
                              f"{' ...' if len(dropped) > 4 else ''}")
        # inline the intermediate fusion functions no later rule consumed; it also drops dead
        # nodes and unused functions
        onnxscript.optimizer.optimize(model, num_iterations=1, onnx_shape_inference=False)
        known = {v: v.shape for n in graph for v in n.outputs if v.shape is not None}
        infer_shapes(model)
        infer_symbolic_shapes(model)  # onnx's inference stops at com.microsoft ops; onnxruntime's knows them
        for value, shape in known.items():  # where both give up (GroupQueryAttention without a past),
            if value.shape is None:         # a value the rules kept keeps the shape it had
                value.shape = shape
        if self.config.share_shapes:
            report["shape_arithmetic"] = shared_shapes.merge_repeated_shape_arithmetic(model)
        if "attention" in groups:
            report["unfused_attention"] = self._explain(model) if self.config.explain else \
                [n.name for n in model.graph if n.op_type == "Softmax"]
            if report["unfused_attention"]:
                self.ctx.warn(f"fuse: {len(report['unfused_attention'])} attention-shaped subgraph(s) (Softmax) "
                              "left unfused; report.json fuse.unfused_attention says why")
        report["fused_ops"] = _fused_op_counts(model)
        return signature(model) != before

    def _mark_fused_layers(self, graph: ir.Graph) -> None:
        """A quantized layer that a rule swallowed (the attention MatMuls) is float now."""
        names = {n.name for n in graph}
        for record in self.ctx.layers.quantized():
            if record.name not in names:
                self.ctx.layers.fall_back(record.name, "fused into a float operator by `fuse` (its Q/DQ was "
                                                       "inside the fused subgraph)")

    def _allowed_groups(self) -> set[str]:
        allowed = self.ctx.target.setting("fusions")
        if allowed is None:
            raise RecipeError(f"target {self.ctx.target.name} does not say which fusions it runs "
                              "(`fusions` in its descriptor)", pass_name="fuse", key="rules")
        return set(allowed)

    def _explain(self, model: ir.Model) -> list[dict]:
        """For each remaining Softmax: the SDPA rule's best partial match around it, and why it failed."""
        softmaxes = [n for n in model.graph if n.op_type == "Softmax"]
        if not softmaxes:
            return []
        tracer = MatchingTracer()
        for step in fusions.STEPS:
            if step.name in _ATTENTION_TRACED:
                step.rules.apply_to_model(model, tracer=tracer)
        infos = [info for per_rule in tracer.best_matches_map.values() for info in per_rule]
        out = []
        for sm in softmaxes:
            readers = {id(u.node) for u in sm.outputs[0].uses()}
            near = [i for i in infos if sm in i.match_result.nodes or id(i.root_node) in readers
                    or sm in i.match_result.failure_nodes_and_values]
            best = max(near or infos, key=lambda i: i.score(), default=None)
            entry = {"softmax": sm.name}
            if best is None or (not near and best.status == MatchStatus.NO_MATCH):
                entry["why"] = "no attention rule matched any node around this Softmax"
            else:
                entry["why"] = best.match_result.reason or best.status.name.lower()
                entry["status"] = best.status.name
                entry["matched"] = [n.name for n in best.match_result.nodes][:12]
                entry["at"] = [getattr(x, "name", str(x)) for x in best.match_result.failure_nodes_and_values][:4]
            out.append(entry)
        return out


def fusion_candidates(model: ir.Model) -> list[str]:
    """Node names that a fusion group could start from: a Softmax read by a MatMul (attention),
    a ReduceMean (a spelled-out LayerNorm/RMSNorm), Erf or Tanh (GELU), Sin/Cos (rotary tables).
    Empty for a CNN: its compile then keeps its opset."""
    found = []
    for node in model.graph:
        if node.op_type == "Softmax" and any(u.node.op_type == "MatMul" for u in node.outputs[0].uses()):
            found.append(node.name)
        elif node.op_type in ("ReduceMean", "Erf", "Tanh", "Sin", "Cos"):
            found.append(node.name)
    return found


def _fused_op_counts(model: ir.Model) -> dict[str, int]:
    produced = {op.split("::")[-1] for ops in fusions.PRODUCES.values() for op in ops}
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in produced:
            key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            counts[key] = counts.get(key, 0) + 1
    return counts
