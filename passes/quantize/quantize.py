"""The `quantize` pass: plan the layers (plan.py), quantize their weights (weights.py) and static
activations (activations.py) or rewrite them to dynamic integer ops (compiler/dynamic_qdq.py),
record each decision in the layer table."""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile import dynamic_qdq
from qcompile.analyses import RangeRequest
from qcompile.errors import ModelError
from qcompile.facts import Fact
from qcompile.layers import LayerRecord, LayerStatus, WeightBytes
from qcompile.registry import QPass, register_pass
from qcompile.schemes import Scheme

from ..equalization.bias_correction import correct_bias
from .activations import StaticActivations, activation_dtype, fall_back_by_range, range_guard
from .config import QuantizeConfig, schemes
from .plan import LayerPlan, const, plan_layers, wants_ranges
from .regions import int8_region
from .residuals import residual_skips
from .weights import (initializer_bytes, layer_granularity, quantize_bias, quantize_weight, takes_int32_bias,
                      u8s8_safe, why_granularity)


@register_pass("quantize")
class Quantize(QPass):
    """Quantize Conv/MatMul/Gemm: weights, static or dynamic activations, int32 bias, per-scope schemes."""

    Config = QuantizeConfig

    @classmethod
    def schemes(cls, config) -> list[Scheme]:
        return schemes(config)

    @classmethod
    def needs(cls, config) -> frozenset[Fact]:
        static = any(s.activation is not None and not s.activation.is_dynamic for s in schemes(config))
        return frozenset({Fact.RANGES}) if static else frozenset()

    GIVES = frozenset({Fact.QDQ})

    @classmethod
    def check_model(cls, config, model: ir.Model) -> None:
        from ..adopt_qdq import quantized_layers
        held = quantized_layers(model)
        if held:
            raise ModelError(f"the model is already quantized ({len(held)} layers hold quantized weights, e.g. "
                             f"{next(iter(held))!r}); quantizing it again would stack a second rounding on the first",
                             hint="leave out --recipe (qcompile then lowers its own quantization: recipe "
                                  "prequantized), or compile the float model")

    @classmethod
    def min_opset(cls, config, target=None, model=None) -> int:
        """Lowest opset whose Q/DQ ops carry every dtype and granularity asked for."""
        need = 13
        for s in schemes(config):
            if s.weight is not None:
                need = max(need, s.weight.min_opset())
            if s.activation is not None:
                need = max(need, s.activation.min_opset())
        return need

    @classmethod
    def check_target(cls, config, target) -> str | None:
        for scheme in schemes(config):
            if scheme.is_float:
                continue
            where = (f"layers {list(config.include)}" + (f" minus {list(config.exclude)}" if config.exclude else "")
                     if scheme.name == "recipe" else f"layers given scheme {scheme.name!r} by mix")
            w, act = scheme.weight, scheme.activation
            if w.dtype not in target.weight_dtypes:
                return (f"{where}: {w.dtype} weights are not supported by target {target.name} "
                        f"(it supports {', '.join(target.weight_dtypes)})")
            if w.granularity not in target.weight_granularity:
                return (f"{where}: {w.granularity} weights are not supported by {target.name} "
                        f"(it supports {', '.join(target.weight_granularity)})")
            if act is not None:
                if act.dtype != "auto" and act.dtype not in target.activation_dtypes:
                    return (f"{where}: {act.dtype} activations are not supported by {target.name} "
                            f"(it supports {', '.join(target.activation_dtypes)})")
                if act.granularity not in target.activation_granularity:
                    return (f"{where}: {act.granularity} activations are not supported by {target.name} "
                            f"(it supports {', '.join(target.activation_granularity)})")
        need = cls.min_opset(config)
        if need > target.opset_convert_to:
            return (f"the schemes asked for need ONNX opset {need} (FP8 Q/DQ: 19; int4 and per-group: 21), "
                    f"but target {target.name} takes opset {target.opset_convert_to} at most")
        return None

    @classmethod
    def wants_ranges(cls, model: ir.Model, config, target) -> RangeRequest:
        """The layers' tensors (plan.wants_ranges), the outputs of the int8 region's members and,
        where the target's placement asks for them, the residual Adds' skip inputs."""
        plans, _ = plan_layers(model, config, target)
        request = wants_ranges(model, config, target, plans)
        extra = set()
        if config.int8_regions and target is not None and target.setting("int8_elementwise"):
            extra |= {n.outputs[0].name for n in int8_region(model, plans, target.setting("int8_elementwise"))}
        if target is not None and target.setting("residual_skip_inputs"):
            extra |= {skip.name for _, skip in residual_skips(model, plans)}
        return dataclasses.replace(request, tensors=request.tensors | extra) if extra else request

    # -- rewriting ----------------------------------------------------------------
    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        graph = model.graph
        before_bytes = initializer_bytes(graph)
        plans, skipped = plan_layers(model, cfg, ctx.target)
        op_of = {n.name: n.op_type for n in graph}
        if cfg.fallback.max_layers and cfg.fallback.rank_by == "range":
            plans = fall_back_by_range(ctx.stats, plans, skipped, cfg.fallback.max_layers)
        # Static activation params for every tensor first: one Q/DQ pair per tensor.
        acts = StaticActivations(ctx.stats, ctx.target)
        usable = []
        for p in plans:
            if p.static:
                why = range_guard(ctx.stats, p, cfg.range_guard) or acts.prepare(p)
                if why:
                    skipped[p.node.name] = why
                    continue
            usable.append(p)
        cache: dict[tuple, object] = {}
        sizes = {"float": 0, "quantized": 0}
        for p in usable:
            record = self._quantize_layer(graph, p, acts, cache, sizes)
            if p.static:
                acts.route(p)
            ctx.layers.set(record)
        region = self._int8_region(model, usable, acts)
        skips = self._residual_skips(model, usable, acts)
        shifted = self._shift_one_sided(graph, acts)
        conv_outputs = {p.node.outputs[0].name for p in usable if p.node.op_type == "Conv" and p.static}
        through_outputs = cfg.quantize_graph_outputs and \
            (ctx.target is None or ctx.target.setting("quantize_layer_outputs", True))
        act_tensors = acts.insert(graph, conv_outputs if through_outputs else set())
        for name, reason in skipped.items():
            ctx.layers.set(LayerRecord.float(name, op_of.get(name), reason))
        graph.sort()
        common_passes.RemoveUnusedNodesPass()(model)  # drops the float weights now unused
        after_bytes = initializer_bytes(graph)
        labels = sorted({r.label for r in ctx.layers if r.status is LayerStatus.QUANTIZED})
        ctx.reports["quantize"] = {
            "quantized": len(usable), "float": len(skipped), "schemes": labels,
            "activation_tensors": act_tensors,
            "int8_region": dict(sorted(collections.Counter(n.op_type for n in region).items())),
            "residual_skip_inputs": skips,
            "shifted_one_sided_activations": shifted,
            "weights": {"float_bytes": sizes["float"], "quantized_bytes": sizes["quantized"],
                        "compression": round(sizes["float"] / sizes["quantized"], 3) if sizes["quantized"] else None},
            "model_initializer_bytes": {"before": before_bytes, "after": after_bytes,
                                        "compression": round(before_bytes / after_bytes, 3) if after_bytes else None},
        }
        return bool(usable)

    def _int8_region(self, model: ir.Model, usable: list[LayerPlan], acts: StaticActivations) -> list[ir.Node]:
        """The elementwise operators that join the int8 region (regions.py), their Q/DQ routed."""
        ops = self.ctx.target.setting("int8_elementwise") if self.ctx.target is not None else None
        static = [p for p in usable if p.static]
        if not (self.config.int8_regions and ops and static):
            return []
        act = static[0].scheme.activation
        without: frozenset[str] = frozenset()
        while True:
            members = int8_region(model, static, ops, without=without)
            missing = acts.join_region(members, act)
            if not missing:
                return members
            without |= frozenset(missing)

    def _residual_skips(self, model: ir.Model, usable: list[LayerPlan], acts: StaticActivations) -> int:
        """Residual Adds quantized on their skip input, where the target's placement asks for it."""
        static = [p for p in usable if p.static]
        if not (static and self.ctx.target is not None and self.ctx.target.setting("residual_skip_inputs")):
            return 0
        return acts.join_skips(residual_skips(model, static), static[0].scheme.activation)

    def _shift_one_sided(self, graph: ir.Graph, acts: StaticActivations) -> list[str]:
        """One-sided tensors quantized as with a zero point (shifts.py), where the target asks for
        it. After the layers were rewritten, so only where biases stay float: an int32 bias
        would have been computed with the unshifted scale (cuda keeps them float)."""
        target = self.ctx.target
        if not (self.config.shift_one_sided and target is not None and target.setting("shift_one_sided_activations")
                and not target.setting("int32_bias", True)):
            return []
        return acts.shift_one_sided(graph)

    def _quantize_layer(self, graph, p: LayerPlan, acts: StaticActivations, cache: dict, sizes: dict) -> LayerRecord:
        node, scheme, target = p.node, p.scheme, self.ctx.target
        act = scheme.activation
        act_dtype = acts.dtype_of(p) if (p.static and p.activations) else \
            (activation_dtype(act, target) if act is not None else None)
        applied_act = dataclasses.replace(act, dtype=act_dtype) if act is not None else None
        applied_weight = scheme.weight
        # read now: a ReLU folded upstream has already rewired this input
        input_tensor = next((v.name for v in node.inputs[:2] if v is not None and v.const_value is None), None)
        output_tensor = node.outputs[0].name
        notes: list[str] = []
        weight_bytes = None
        if p.weight_index is not None:
            w_val = node.inputs[p.weight_index]
            weight = u8s8_safe(scheme.weight, node, p, act_dtype, target)
            if weight is not scheme.weight:
                notes.append(f"7-bit weights: {target.name}:{target.variant}'s U8S8 {node.op_type} kernels saturate "
                             "8-bit ones (int16 pair sums)")
                applied_weight = weight
            granularity, block_axis = layer_granularity(node, p, weight, target)
            if granularity != weight.granularity:
                notes.append(f"{node.op_type} weights are {granularity}, not {weight.granularity}: "
                             f"{why_granularity(node, granularity)}")
                applied_weight = dataclasses.replace(weight, granularity=granularity)
            key = (w_val.name, weight, granularity, p.dynamic)
            qw = cache.get(key)
            if qw is None:
                qw = quantize_weight(graph, w_val, p, weight, granularity, block_axis,
                                     self.ctx.weights.get(w_val.name), self.ctx.warn)
                sizes["float"] += w_val.const_value.size * 4
                sizes["quantized"] += qw.nbytes
                if len(w_val.uses()) > 1:   # only a shared weight is kept: the integers of a 7B are 7 GB
                    cache[key] = qw
            weight_bytes = WeightBytes(int(w_val.const_value.size * 4), qw.nbytes)
            bias = node.inputs[2] if len(node.inputs) > 2 and node.op_type in ("Conv", "Gemm") else None
            if p.dynamic:
                x = node.inputs[0]  # now: an upstream dynamic layer may have replaced the value planned
                b = const(bias) if bias is not None else None
                if bias is not None and b is None:
                    notes.append("bias is not constant; kept float")
                new_out = dynamic_qdq.integer_layer(graph, node, x, qw.q, qw.scale, b,
                                                    per_token=act.granularity == "per_token"
                                                    and node.op_type != "Conv")
                if act.granularity == "per_token" and node.op_type == "Conv":
                    notes.append("per_token applies to MatMul/Gemm rows; Conv uses dynamic per_tensor")
                    applied_act = dataclasses.replace(act, dtype="uint8", granularity="per_tensor", dynamic=True)
                output_tensor = new_out.name
                if bias is not None and bias.const_value is None:
                    notes.append("non-constant Gemm bias is not supported with dynamic activations")
            else:
                if self.config.bias_correction and p.static:
                    observed = self.ctx.stats.get(p.activations[0].name)
                    plain = granularity != "per_group" and scheme.weight.symmetric
                    bias = correct_bias(graph, node, w_val, qw.q, qw.scale,
                                        p.axis if granularity == "per_channel" else None,
                                        observed.channel_mean() if observed is not None else None, bias, notes,
                                        plain_weights=plain)
                node.replace_input_with(p.weight_index, qw.value)
                if bias is not None and takes_int32_bias(p, act_dtype, granularity, target):
                    note = quantize_bias(graph, node, bias, acts.scale_of(p.activations[0]), qw.scale)
                    if note:
                        notes.append(note)
        if p.in_kernel and node.op_type != "MatMul":
            notes.append(f"per_group activations are quantized inside a MatMul kernel; this {node.op_type} "
                         "computes in float behind its weight's DequantizeLinear")
            applied_act = None
        folded = None
        if p.folded is not None:
            p.folded.outputs[0].replace_all_uses_with(node.outputs[0])
            graph.remove(p.folded, safe=True)
            folded = p.folded.op_type
        applied = dataclasses.replace(scheme, weight=applied_weight, activation=applied_act)
        return LayerRecord.quantized(node.name, node.op_type, applied, has_weight=p.weight_index is not None,
                                     input_tensor=input_tensor, output_tensor=output_tensor,
                                     weight_bytes=weight_bytes, folded=folded, notes=notes)



