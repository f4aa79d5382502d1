"""quantize: turn Conv, MatMul and Gemm into quantized layers, one scheme per layer.

The scheme (compiler/schemes.py) comes from the recipe's `weight`/`activation`, or for
layers matched by the recipe's `mix` table (glob → built-in scheme name or `float`)
from that scheme. What each layer becomes:

* weights: an int8/uint8/int4/uint4/FP8 initializer + DequantizeLinear, per tensor,
  per output channel, or per group along the reduction axis (ONNX `block_size`);
  rounded as the scheme says (stochastic rounding seeded per weight);
* static activations: one QuantizeLinear→DequantizeLinear pair per tensor from the
  calibrated range; Conv/Gemm biases become int32 at s_x·s_w (what onnxruntime needs
  to fuse an int8 kernel); ReLU/Clip fold into an asymmetric output quantization;
* dynamic activations (per-token or per-tensor, scales at run time): standard ONNX
  integer ops (compiler/dynamic_qdq.py);
* `activation: null`: weight-only (W8A16, W4A16).

Every layer left float has its reason in the report; every quantized one its scheme
and its weight bytes before/after.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import zlib
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile import dynamic_qdq
from qcompile.numerics import (INT_TYPES, bits, block_minmax, compute_qparams, dequantize, full_range_qparams,
                               is_float8, qrange, quantize, reduce_absmax, to_storage)
from qcompile.errors import RecipeError
from qcompile.qdq import add_initializer as qdq_add_initializer
from qcompile.qdq import insert_qdq, store_weight_quantized
from qcompile.registry import QPass, register_pass
from qcompile.schemes import ActivationScheme, Scheme, WeightScheme, builtin_scheme, mixable_schemes, \
    scheme_compatibility

from .scope import matches

_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
# entropy/MSE ranges search an integer grid; FP8 activations use int8's as their proxy
_GRID_FOR_RANGE = {"float8e4m3fn": "int8", "float8e5m2": "int8", "int4": "int4", "uint4": "uint4"}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    node: ir.Node
    scheme: Scheme
    weight_index: int | None     # input index of the constant weight
    axis: int | None             # per-channel axis of that weight
    activations: tuple[ir.Value, ...]
    output: ir.Value | None      # tensor whose range quantizes the layer output (None: left float)
    folded: ir.Node | None       # ReLU/Clip folded into the output quantization

    @property
    def static(self) -> bool:
        act = self.scheme.activation
        return act is not None and not act.is_dynamic

    @property
    def dynamic(self) -> bool:
        act = self.scheme.activation
        return act is not None and act.is_dynamic


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Automatic fallback: the `max_layers` layers ranked worst stay float. `range`: by the
    range measure max|x|/std of the layer's input (calibration histograms, in this pass);
    `error`: by the noise each layer adds when quantized (a first compile is verified, then
    the model is compiled again without them: compiler/budget.py)."""
    max_layers: int = 0
    rank_by: Literal["error", "range"] = "error"

    def validate(self):
        if self.max_layers < 0:
            return "max_layers", f"must be at least 0, got {self.max_layers}"
        return None


@dataclasses.dataclass(frozen=True)
class RangeGuard:
    """Range-aware placement: a static activation that joins quantities of very different
    scales cannot share one per-tensor scale. The layer reading it stays float when the
    tensor is a Concat whose inputs' ranges differ more than `concat_ratio` times (a detector
    head joining pixel boxes with [0, 1] scores), or when it holds values beyond `max_abs` or
    Inf/NaN (an attention mask of -3.4e38). 0 turns a check off."""
    concat_ratio: float = 64.0
    max_abs: float = 1e6

    def validate(self):
        if self.concat_ratio < 0 or self.max_abs < 0:
            return "concat_ratio", "must be >= 0 (0 turns the check off)"
        return None


@register_pass("quantize")
class Quantize(QPass):
    """Quantize Conv/MatMul/Gemm: weights, static or dynamic activations, int32 bias, per-scope schemes."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        op_types: tuple[Literal["Conv", "MatMul", "Gemm"], ...] = ("Conv", "MatMul", "Gemm")
        weight: WeightScheme = WeightScheme()
        activation: ActivationScheme | None = ActivationScheme()
        # per-scope schemes, first matching glob wins: {"*attention*": w8a16, "*head*": float}
        mix: dict[str, str] = dataclasses.field(default_factory=dict)
        fold_activations: bool = True
        # a Conv feeding a graph output gets Q/DQ on it too: onnxruntime fuses QLinearConv only then
        quantize_graph_outputs: bool = True
        # which static layers get Q/DQ on their output: `conv` (onnxruntime's QLinearConv needs it;
        # MatMul/Gemm fuse to MatMulIntegerToFloat/QGemm with a float output, and an output that
        # feeds a residual Add or LayerNorm keeps its outlier channels unclipped) or `all`
        output_quantization: Literal["conv", "all"] = "conv"
        # keep layers float where the target says int8 is slower (its `int8_min_macs`)
        speed_fallback: bool = True
        fallback: Fallback = Fallback()
        range_guard: RangeGuard = RangeGuard()
        # subtract each layer's weight-quantization mean shift ΔW·E[x] from its bias (DFQ's bias
        # correction; E[x] per input channel from calibration)
        bias_correction: bool = False

        def validate(self) -> tuple[str, str] | None:
            problem = scheme_compatibility(self.weight, self.activation)
            if problem:
                return problem
            for glob, name in self.mix.items():
                try:
                    builtin_scheme(name)
                except KeyError:
                    return f"mix.{glob}", (f"unknown scheme {name!r}; a mix maps a layer-name glob to one of: "
                                           f"{', '.join(mixable_schemes())}")
            return None

    @classmethod
    def schemes(cls, config) -> list[Scheme]:
        """Every scheme this config can give a layer (the recipe's and the mix table's)."""
        return [Scheme("recipe", config.weight, config.activation)] + \
            [builtin_scheme(name) for name in config.mix.values()]

    @classmethod
    def scheme_for(cls, config, layer: str) -> Scheme:
        for glob, name in config.mix.items():
            if fnmatch.fnmatchcase(layer, glob):
                return builtin_scheme(name)
        return Scheme("recipe", config.weight, config.activation)

    @classmethod
    def needs(cls, config) -> set[str]:
        static = any(s.activation is not None and not s.activation.is_dynamic for s in cls.schemes(config))
        return {"ranges"} if static else set()

    @classmethod
    def gives(cls, config) -> set[str]:
        return {"qdq"}

    @classmethod
    def min_opset(cls, config, target=None) -> int:
        """Lowest opset whose Q/DQ ops carry every dtype and granularity asked for."""
        need = 13
        for s in cls.schemes(config):
            if s.weight is not None:
                need = max(need, s.weight.min_opset())
            if s.activation is not None:
                need = max(need, s.activation.min_opset())
        return need

    @classmethod
    def check_target(cls, config, target) -> str | None:
        for scheme in cls.schemes(config):
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

    # -- planning -----------------------------------------------------------------
    @classmethod
    def plan(cls, model: ir.Model, config, target=None) -> tuple[list[LayerPlan], dict[str, str]]:
        """Which layers get quantized with which scheme, and why each other candidate stays float."""
        plans, skipped = [], {}
        min_macs = target.setting("int8_min_macs") if (target is not None and config.speed_fallback) else None
        outputs = set(model.graph.outputs)
        for node in model.graph:
            if node.op_type not in ("Conv", "MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or ""
            if node.op_type not in config.op_types:
                skipped[name] = f"op type {node.op_type} not in quantize.op_types"
                continue
            if not matches(name, config.include):
                skipped[name] = "not matched by quantize.include"
                continue
            if matches(name, config.exclude):
                skipped[name] = "excluded by quantize.exclude"
                continue
            scheme = cls.scheme_for(config, name)
            if scheme.is_float:
                skipped[name] = "mix: float"
                continue
            act = scheme.activation
            static = act is not None and not act.is_dynamic
            if min_macs and static and act.dtype in ("auto", "int8", "uint8"):
                macs = layer_macs(node)
                if macs is not None and macs < min_macs:
                    skipped[name] = (f"int8 is slower than float for layers under {min_macs} MACs on "
                                     f"{target.variant} (tools/cpu_layer_costs.py); this one has {macs}")
                    continue
            found = cls._weight_of(node)
            if isinstance(found, str):
                if not static or node.op_type != "MatMul":
                    skipped[name] = found
                    continue
                weight_index, axis = None, None  # MatMul of two activations: both quantized
            else:
                weight_index, axis = found
            acts = tuple(v for i, v in enumerate(node.inputs[:2]) if v is not None and i != weight_index
                         and v.const_value is None)
            out = node.outputs[0] if (static and (node.op_type == "Conv" or config.output_quantization == "all")) \
                else None
            folded = None
            if out is not None and config.fold_activations and not activation_symmetric(act, target) \
                    and act.dtype in ("auto", "uint8", "uint4"):
                users = out.uses()
                if len(users) == 1 and out not in outputs:
                    user = users[0].node
                    if user.op_type in _FOLDABLE_ACTIVATIONS and user.outputs[0] not in outputs \
                            and _clip_floor_is_zero(user):
                        folded = user
            plans.append(LayerPlan(node, scheme, weight_index, axis, acts,
                                   folded.outputs[0] if folded else out, folded))
        if config.fallback.max_layers > len(plans):
            raise RecipeError(f"fallback.max_layers is {config.fallback.max_layers}, but this model has only "
                              f"{len(plans)} layers to quantize", pass_name="quantize", key="fallback.max_layers")
        return plans, skipped

    @staticmethod
    def _weight_of(node: ir.Node) -> tuple[int, int] | str:
        """(input index, per-channel axis) of the constant weight, or why there is none."""
        if node.op_type == "Conv":
            w = node.inputs[1]
            return (1, 0) if _const(w) is not None else "Conv weight is not a constant"
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
                return "Gemm with alpha/beta != 1 (int32 bias needs beta = 1)"
            if attrs.get_int("transA", 0):
                return "Gemm with transA"
            if _const(node.inputs[1]) is None:
                return "Gemm B is not a constant"
            return (1, 0 if attrs.get_int("transB", 0) else 1)
        # MatMul: weight is the constant right-hand side, per output column.
        w = _const(node.inputs[1])
        if w is None:
            return "MatMul has no constant weight"
        return (1, w.ndim - 1)

    @classmethod
    def range_request(cls, model: ir.Model, config, ctx) -> set[str]:
        plans, _ = cls.plan(model, config, ctx.target)
        wanted = {v.name for p in plans if p.static for v in (*p.activations, p.output) if v is not None}
        if config.bias_correction:  # per-channel input means for bias correction
            for p in plans:
                if p.static and p.weight_index is not None and p.activations:
                    ctx.channel_axes[p.activations[0].name] = 1 if p.node.op_type == "Conv" else -1
        if config.range_guard.concat_ratio:  # the parts of a concatenated input, for range_guard
            wanted |= {part.name for p in plans if p.static for v in p.activations
                       for part in _concat_parts(v)}
        return wanted

    # -- rewriting ----------------------------------------------------------------
    def _activation_dtype(self, act: ActivationScheme) -> str:
        if act.dtype == "auto":
            return "int8" if act.is_dynamic else self.ctx.target.setting("activation_dtype", "uint8")
        return act.dtype

    def _activation_params(self, value: ir.Value, act: ActivationScheme, dtype: str):
        stats = self.ctx.stats.get(value.name)
        if stats is None or stats.count == 0:
            return f"no calibration range for tensor {value.name!r}"
        cal = self.ctx.calibration
        symmetric = activation_symmetric(act, self.ctx.target) or is_float8(dtype)
        lo, hi = stats.range(cal.method, percentile=cal.percentile, dtype=_GRID_FOR_RANGE.get(dtype, dtype),
                             symmetric=symmetric)
        return compute_qparams(lo, hi, dtype, symmetric=symmetric)

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        graph = model.graph
        before_bytes = _initializer_bytes(graph)
        plans, skipped = self.plan(model, cfg, ctx.target)
        if cfg.fallback.max_layers and cfg.fallback.rank_by == "range":
            plans = self._fall_back_by_range(plans, skipped, cfg.fallback.max_layers)
        # Static activation params for every tensor first: one Q/DQ pair per tensor.
        act_params: dict[str, tuple] = {}       # tensor -> (scale, zero point, dtype)
        usable = []
        for p in plans:
            if p.static:
                guarded = self._range_guard(p)
                if guarded:
                    skipped[p.node.name] = guarded
                    continue
                dtype = self._activation_dtype(p.scheme.activation)
                problems = []
                for v in (*p.activations, p.output):
                    if v is not None and v.name not in act_params:
                        params = self._activation_params(v, p.scheme.activation, dtype)
                        if isinstance(params, str):
                            problems.append(params)
                        else:
                            act_params[v.name] = (*params, dtype)
                if problems:
                    skipped[p.node.name] = problems[0]
                    continue
            usable.append(p)
        quantized_weights: dict[tuple, tuple] = {}
        act_tensors: dict[str, ir.Value] = {}
        consumers: dict[str, set | None] = {}   # None: every consumer (a layer output)
        sizes = {"float": 0, "quantized": 0}
        for p in usable:
            record = self._quantize_layer(graph, p, act_params, quantized_weights, sizes)
            node = p.node
            if p.static:
                for v in p.activations:
                    act_tensors.setdefault(v.name, v)
                    if consumers.get(v.name, set()) is not None:
                        consumers.setdefault(v.name, set()).add(node)
                if p.output is not None:
                    out = node.outputs[0] if p.folded is not None else p.output
                    act_tensors.setdefault(p.output.name, out)
                    consumers[p.output.name] = None
            ctx.layers[node.name] = record
        conv_outputs = {p.node.outputs[0].name for p in usable if p.node.op_type == "Conv" and p.static}
        for name, value in act_tensors.items():
            scale, zp, dtype = act_params[name]
            insert_qdq(graph, value, scale, to_storage(np.asarray(zp), dtype),
                       through_graph_output=cfg.quantize_graph_outputs and value.name in conv_outputs,
                       consumers=consumers.get(name))
        for name, reason in skipped.items():
            ctx.layers[name] = {"status": "float", "reason": reason}
        graph.sort()
        common_passes.RemoveUnusedNodesPass()(model)  # drops the float weights now unused
        after_bytes = _initializer_bytes(graph)
        schemes = sorted({r["scheme"] for r in ctx.layers.values() if r.get("status") == "quantized"})
        ctx.report["quantize"] = {
            "quantized": len(usable), "float": len(skipped), "schemes": schemes,
            "activation_tensors": len(act_tensors),
            "weights": {"float_bytes": sizes["float"], "quantized_bytes": sizes["quantized"],
                        "compression": round(sizes["float"] / sizes["quantized"], 3) if sizes["quantized"] else None},
            "model_initializer_bytes": {"before": before_bytes, "after": after_bytes,
                                        "compression": round(before_bytes / after_bytes, 3) if after_bytes else None},
        }
        return bool(usable)

    def _range_guard(self, p: LayerPlan) -> str | None:
        """Why one per-tensor scale cannot serve this layer's input (None: it can)."""
        guard = self.config.range_guard
        for v in p.activations:
            stats = self.ctx.stats.get(v.name)
            if stats is None:
                continue
            if guard.max_abs and (stats.nonfinite or max(abs(stats.min), abs(stats.max)) > guard.max_abs):
                what = f"{stats.nonfinite} Inf/NaN values" if stats.nonfinite else \
                    f"values up to {max(abs(stats.min), abs(stats.max)):.3g}"
                return (f"range_guard: input {v.name!r} holds {what} (beyond max_abs {guard.max_abs:g}); "
                        "one int8 scale would flatten everything else")
            parts = [(part.name, self.ctx.stats.get(part.name)) for part in _concat_parts(v)]
            spans = {n: max(abs(s.min), abs(s.max)) for n, s in parts if s is not None and s.count}
            if guard.concat_ratio and len(spans) > 1 and min(spans.values()) > 0:
                ratio = max(spans.values()) / min(spans.values())
                if ratio > guard.concat_ratio:
                    lo, hi = min(spans, key=spans.get), max(spans, key=spans.get)
                    return (f"range_guard: input {v.name!r} concatenates {hi!r} (|x| up to {spans[hi]:.3g}) with "
                            f"{lo!r} (up to {spans[lo]:.3g}), {ratio:.0f}x apart; one scale would erase the smaller")
        return None

    def _fall_back_by_range(self, plans: list[LayerPlan], skipped: dict, count: int) -> list[LayerPlan]:
        """Keep the `count` layers whose inputs have the highest max|x|/std in float."""
        def measure(p: LayerPlan) -> float:
            stats = [self.ctx.stats.get(v.name) for v in p.activations]
            return max((s.range_measure() for s in stats if s is not None), default=0.0)

        ranked = sorted(plans, key=measure, reverse=True)
        dropped = {id(p) for p in ranked[:count]}
        for p in ranked[:count]:
            skipped[p.node.name] = (f"fallback: input range measure max|x|/std = {measure(p):.1f}, "
                                    f"among the {count} highest")
        return [p for p in plans if id(p) not in dropped]

    def _quantize_layer(self, graph, p: LayerPlan, act_params, quantized_weights, sizes) -> dict:
        node, scheme = p.node, p.scheme
        act = scheme.activation
        act_dtype = act_params[p.activations[0].name][2] if (p.static and p.activations) else \
            (self._activation_dtype(act) if act is not None else None)
        record = {"op": node.op_type, "status": "quantized", "scheme": _scheme_label(scheme, act_dtype),
                  "weight": None, "activation": act.label(act_dtype) if act is not None else "float",
                  # read now: a ReLU folded upstream has already rewired this input
                  "input_tensor": next((v.name for v in node.inputs[:2]
                                        if v is not None and v.const_value is None), None),
                  "output_tensor": node.outputs[0].name}
        notes = []
        if p.weight_index is not None:
            w_val = node.inputs[p.weight_index]
            granularity, block_axis = self._granularity(node, p, scheme.weight)
            if granularity != scheme.weight.granularity:
                why = "the target takes this op's weights per tensor" if granularity == "per_tensor" \
                    else "the Conv has fewer input channels per group than group_size (depthwise: 1)" \
                    if node.op_type == "Conv" \
                    else "dynamic activations need per-channel weights"
                notes.append(f"{node.op_type} weights are {granularity}, not {scheme.weight.granularity}: {why}")
                actual = dataclasses.replace(scheme, weight=dataclasses.replace(scheme.weight, granularity=granularity))
                record["scheme"] = _scheme_label(actual, act_dtype)
            key = (w_val.name, scheme.weight, granularity, p.dynamic)
            if key not in quantized_weights:
                quantized_weights[key] = self._quantize_weight(graph, w_val, p, scheme.weight, granularity,
                                                               block_axis, sizes)
            q_out, w_scale, q_array, nbytes = quantized_weights[key]
            record["weight"] = scheme.weight.label() if granularity == scheme.weight.granularity else \
                f"{scheme.weight.dtype} {granularity}"
            record["weight_bytes"] = {"float": int(_const(w_val).size * 4), "quantized": nbytes}
            bias = node.inputs[2] if len(node.inputs) > 2 and node.op_type in ("Conv", "Gemm") else None
            if p.dynamic:
                x = node.inputs[0]  # now: an upstream dynamic layer may have replaced the value planned
                b = _const(bias) if bias is not None else None
                if bias is not None and b is None:
                    notes.append("bias is not constant; kept float")
                    b = None
                new_out = dynamic_qdq.integer_layer(graph, node, x, q_array, w_scale, b,
                                                    per_token=act.granularity == "per_token"
                                                    and node.op_type != "Conv")
                if act.granularity == "per_token" and node.op_type == "Conv":
                    notes.append("per_token applies to MatMul/Gemm rows; Conv uses dynamic per_tensor")
                    record["activation"] = "uint8 dynamic per_tensor"
                    record["scheme"] = record["scheme"].replace("A[int8 dynamic per_token]",
                                                                "A[uint8 dynamic per_tensor]")
                record["output_tensor"] = new_out.name
                if bias is not None and bias.const_value is None:
                    notes.append("non-constant Gemm bias is not supported with dynamic activations")
            else:
                if self.config.bias_correction and p.static:
                    bias = self._correct_bias(graph, node, p, w_val, q_array, w_scale, granularity, bias, notes)
                node.replace_input_with(p.weight_index, q_out)
                if bias is not None and p.static and p.activations and act_dtype in ("int8", "uint8") \
                        and granularity != "per_group" and not is_float8(scheme.weight.dtype):
                    note = self._quantize_bias(graph, node, bias, act_params[p.activations[0].name][0], w_scale)
                    if note:
                        notes.append(note)
        if p.folded is not None:
            folded_out = p.folded.outputs[0]
            folded_out.replace_all_uses_with(node.outputs[0])
            graph.remove(p.folded, safe=True)
            record["folded"] = p.folded.op_type
        if notes:
            record["note"] = "; ".join(notes)
        return record

    def _granularity(self, node, p: LayerPlan, weight: WeightScheme) -> tuple[str, int | None]:
        """(granularity used, block axis for per_group)."""
        granularity = weight_granularity(weight, self.ctx.target, node.op_type)
        if p.dynamic and granularity == "per_group":
            granularity = "per_channel"
        if granularity != "per_group":
            return granularity, None
        if node.op_type == "Conv":  # groups along the input channels, per output channel and tap
            w = node.inputs[p.weight_index].const_value
            return ("per_group", 1) if w.shape[1] >= weight.group_size else ("per_channel", None)
        if node.op_type == "Gemm":
            return "per_group", (1 if node.attributes.get_int("transB", 0) else 0)
        return "per_group", _const(node.inputs[p.weight_index]).ndim - 2  # MatMul: the K axis

    def _quantize_weight(self, graph: ir.Graph, w_val: ir.Value, p: LayerPlan, scheme: WeightScheme,
                         granularity: str, block_axis: int | None, sizes: dict):
        w = w_val.const_value.numpy().astype(np.float32)
        axis = p.axis if granularity == "per_channel" else None
        block = None
        if granularity == "per_group":
            axis, block = block_axis, scheme.group_size
        chosen = self._precomputed(w_val, p, scheme, granularity, axis, block)
        if chosen is not None:
            q, scale, zp = chosen
        else:
            q, scale, zp = self._round_weight(w, w_val.name, scheme, axis, block)
        nbytes = (q.size * bits(scheme.dtype) + 7) // 8 + scale.size * 4 + \
            (0 if scheme.symmetric else (zp.size * bits(scheme.dtype) + 7) // 8)
        sizes["float"] += w.size * 4
        sizes["quantized"] += nbytes
        if p.dynamic:  # integer ops take the raw int8 weight, laid out for MatMulInteger ([K, N])
            if p.node.op_type == "Gemm" and p.node.attributes.get_int("transB", 0):
                q = np.ascontiguousarray(q.T)
            return None, scale, q, nbytes
        out = store_weight_quantized(graph, w_val, to_storage(q, scheme.dtype), scale,
                                     to_storage(np.asarray(zp), scheme.dtype), axis, block)
        return out, scale, q, nbytes

    def _correct_bias(self, graph, node, p: LayerPlan, w_val, q, w_scale, granularity, bias, notes):
        """Bias correction: b -= (W_q - W)·E[x], the output mean shift weight rounding causes.
        Conv and Gemm biases (added when the Conv has none); MatMul keeps its mean shift."""
        stats = self.ctx.stats.get(p.activations[0].name)
        mean = stats.channel_mean() if stats is not None else None
        if mean is None or node.op_type == "MatMul":
            if node.op_type == "MatMul":
                notes.append("bias correction: MatMul has no bias input here; not corrected")
            return bias
        if granularity == "per_group" or not p.scheme.weight.symmetric:
            return bias  # grouped or offset weights: not handled
        w = w_val.const_value.numpy().astype(np.float64)
        axis = p.axis if granularity == "per_channel" else None
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
        value = qdq_add_initializer(graph, f"{node.name}_bias_corrected", corrected)
        if bias is None:  # a Conv/Gemm without a bias gets one
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        notes.append(f"bias corrected (max |shift| {float(np.abs(shift).max()):.3g})")
        return value

    def _precomputed(self, w_val, p: LayerPlan, scheme, granularity, axis, block):
        """Integers and scales a weight algorithm (gptq) chose for this weight, in this pass's layout,
        when they were made for the same scheme; None otherwise (with a warning if they differ)."""
        pre = self.ctx.precomputed_weights.get(w_val.name)
        if pre is None:
            return None
        if pre.scheme != scheme or pre.granularity != granularity or p.dynamic:
            self.ctx.warn(f"{p.node.name}: the weight algorithm quantized {w_val.name} as {pre.scheme.label()}, "
                          f"but quantize asks for {scheme.label()}; rounding it again")
            return None
        transposed = p.node.op_type == "Gemm" and p.node.attributes.get_int("transB", 0)
        q, scale = pre.q, pre.scale
        if transposed:  # gptq works on [K, N]; this weight is [N, K]
            q = np.ascontiguousarray(q.T)
            scale = np.ascontiguousarray(scale.T) if block else scale
        if (axis is None) != (pre.axis is None) or q.shape != tuple(w_val.const_value.shape):
            return None
        zp = np.zeros(scale.shape, dtype=q.dtype)
        return q, scale, zp

    def _round_weight(self, w: np.ndarray, name: str, scheme: WeightScheme, axis, block):
        """Round-to-nearest (or the scheme's rounding mode) with min/max scales."""
        if block:
            lo, hi = block_minmax(w, axis, block)
        else:
            lo, hi = reduce_absmax(w, axis)
        if scheme.full_range:
            scale, zp = full_range_qparams(lo, hi, scheme.dtype)
        else:
            scale, zp = compute_qparams(lo, hi, scheme.dtype, symmetric=scheme.symmetric, restricted=True,
                                        reduce_range=scheme.reduce_range)
        rng = np.random.default_rng([scheme.seed, zlib.crc32(name.encode())]) \
            if scheme.rounding == "stochastic" else None
        q = quantize(w, scale, zp, scheme.dtype, axis=axis, block_size=block, rounding=scheme.rounding, rng=rng)
        if scheme.symmetric and not scheme.full_range and not is_float8(scheme.dtype):
            qmin, qmax = qrange(scheme.dtype, restricted=True, reduce_range=scheme.reduce_range)
            q = np.clip(q, qmin, qmax).astype(q.dtype)  # floor/ceil/stochastic can step past -qmax
        return q, scale, zp

    def _quantize_bias(self, graph, node, bias: ir.Value, x_scale: np.ndarray, w_scale: np.ndarray) -> str | None:
        b = _const(bias)
        if b is None:
            return "bias is not constant; kept float"
        if b.ndim > 1 and int(np.prod(b.shape[:-1])) != 1:
            return f"bias of shape {list(b.shape)} is not a per-channel vector; kept float"
        b = b.reshape(-1)
        scale = (np.float32(x_scale) * w_scale.astype(np.float32)).reshape(-1)
        if scale.size == 1:
            scale = np.full(b.shape[-1], scale[0], dtype=np.float32)
        q = np.rint(b.astype(np.float64) / scale.astype(np.float64))
        lo, hi = INT_TYPES["int32"][:2]
        if q.min() < lo or q.max() > hi:
            return "bias overflows int32 at scale s_x*s_w; kept float"
        out = store_weight_quantized(graph, bias, q.astype(np.int32), scale, np.zeros_like(q, dtype=np.int32), 0)
        node.replace_input_with(2, out)
        return None


def _scheme_label(scheme: Scheme, act_dtype: str | None) -> str:
    act = scheme.activation
    body = f"W[{scheme.weight.label()}] A[{act.label(act_dtype) if act is not None else 'float'}]"
    return body if scheme.name == "recipe" else f"{scheme.name}: {body}"


def _initializer_bytes(graph: ir.Graph) -> int:
    return int(sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None))


def weight_granularity(weight: WeightScheme, target, op_type: str) -> str:
    """The scheme's weight granularity, unless the target takes this op's weights per-tensor
    only (its `per_tensor_weight_ops`, e.g. Ascend: Gemm and MatMul)."""
    if target is not None and op_type in (target.setting("per_tensor_weight_ops") or ()):
        return "per_tensor"
    return weight.granularity


def activation_symmetric(act: ActivationScheme | None, target) -> bool:
    """The scheme's choice, or with `auto` the target's (cpu: asymmetric uint8)."""
    if act is None:
        return False
    if act.symmetric == "auto":
        return bool(target.setting("activation_symmetric", False)) if target is not None else False
    return bool(act.symmetric)


def _concat_parts(value: ir.Value) -> list[ir.Value]:
    """The inputs of the Concat producing `value` (through shape-only ops), else []."""
    node = value.producer()
    while node is not None and node.op_type in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"):
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is None or node.op_type != "Concat":
        return []
    return [v for v in node.inputs if v is not None and v.const_value is None]


def layer_macs(node: ir.Node) -> int | None:
    """Multiply-accumulates of a Conv/MatMul/Gemm from its inferred shapes (None if unknown)."""
    out = node.outputs[0].shape
    w = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if out is None or w is None or not all(isinstance(d, int) for d in (*out, *w)):
        return None
    if node.op_type == "Conv":  # out [N, Cout, *spatial]; w [Cout, Cin/g, *k]
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "Gemm":
        k = w[1] if node.attributes.get_int("transB", 0) else w[0]
        return int(np.prod(out)) * int(k)
    return int(np.prod(out)) * int(w[-2]) if len(w) >= 2 else None  # MatMul


def _clip_floor_is_zero(node: ir.Node) -> bool:
    """ReLU, or Clip whose lower bound is exactly 0 (ReLU6 and friends)."""
    if node.op_type == "Relu":
        return True
    lo = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if lo is None or float(lo) != 0.0:
        return False
    return True
