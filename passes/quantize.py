"""quantize: insert QDQ around Conv, MatMul and Gemm.

Weights are stored as int8 initializers + DequantizeLinear (per-channel symmetric
by default); activations get one QuantizeLinear→DequantizeLinear pair per tensor,
with parameters from the calibrated ranges; Conv/Gemm biases become int32 with
scale s_x·s_w, which onnxruntime needs to fuse the group into an int8 kernel.
ReLU/Clip after a quantized layer fold into the output quantization (uint8 with
zero point 0 saturates exactly like ReLU). With `activation: null` the pass is
weight-only (W8A16).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.numerics import INT_TYPES, compute_qparams, quantize, reduce_absmax
from qcompile.qdq import insert_qdq, store_weight_quantized
from qcompile.registry import QPass, register_pass

_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    dtype: Literal["int8", "uint8"] = "int8"
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: bool = True
    reduce_range: bool = False  # 7-bit weights (onnxruntime's guard against U8S8 overflow)


@dataclasses.dataclass(frozen=True)
class ActivationScheme:
    dtype: Literal["auto", "int8", "uint8"] = "auto"  # auto: what the target's int8 kernels want
    granularity: Literal["per_tensor"] = "per_tensor"
    symmetric: bool | Literal["auto"] = "auto"  # auto: the target's `activation_symmetric`


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    node: ir.Node
    weight_index: int | None     # input index of the constant weight
    axis: int | None             # per-channel axis of that weight
    activations: tuple[ir.Value, ...]
    output: ir.Value             # tensor whose range quantizes the layer output
    folded: ir.Node | None       # ReLU/Clip folded into the output quantization


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


@register_pass("quantize")
class Quantize(QPass):
    """Insert QDQ for Conv/MatMul/Gemm: int8 weights, calibrated activations, int32 bias."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        include: tuple[str, ...] = ("*",)
        exclude: tuple[str, ...] = ()
        op_types: tuple[Literal["Conv", "MatMul", "Gemm"], ...] = ("Conv", "MatMul", "Gemm")
        weight: WeightScheme = WeightScheme()
        activation: ActivationScheme | None = ActivationScheme()
        fold_activations: bool = True
        # a Conv feeding a graph output gets Q/DQ on it too: onnxruntime fuses QLinearConv only then
        quantize_graph_outputs: bool = True
        # keep layers float where the target says int8 is slower (its `int8_min_macs`)
        speed_fallback: bool = True

    @classmethod
    def needs(cls, config) -> set[str]:
        return {"ranges"} if config.activation is not None else set()

    @classmethod
    def gives(cls, config) -> set[str]:
        return {"qdq"}

    @classmethod
    def check_target(cls, config, target) -> str | None:
        scope = f"layers {list(config.include)}" + (f" minus {list(config.exclude)}" if config.exclude else "")
        if config.weight.dtype not in target.weight_dtypes:
            return (f"{scope}: {config.weight.dtype} weights are not supported by target {target.name} "
                    f"(it supports {', '.join(target.weight_dtypes)})")
        if config.weight.granularity not in target.weight_granularity:
            return (f"{scope}: {config.weight.granularity} weights are not supported by {target.name} "
                    f"(it supports {', '.join(target.weight_granularity)})")
        act = config.activation
        if act is not None:
            if act.dtype != "auto" and act.dtype not in target.activation_dtypes:
                return (f"{scope}: {act.dtype} activations are not supported by {target.name} "
                        f"(it supports {', '.join(target.activation_dtypes)})")
            if act.granularity not in target.activation_granularity:
                return (f"{scope}: {act.granularity} activations are not supported by {target.name} "
                        f"(it supports {', '.join(target.activation_granularity)})")
        return None

    # -- planning -----------------------------------------------------------------
    @classmethod
    def plan(cls, model: ir.Model, config, target=None) -> tuple[list[LayerPlan], dict[str, str]]:
        """Which layers get quantized, and why each other candidate stays float."""
        plans, skipped = [], {}
        symmetric = activation_symmetric(config, target)
        min_macs = target.setting("int8_min_macs") if (target is not None and config.speed_fallback) else None
        outputs = set(model.graph.outputs)
        for node in model.graph:
            if node.op_type not in ("Conv", "MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or ""
            if node.op_type not in config.op_types:
                skipped[name] = f"op type {node.op_type} not in quantize.op_types"
                continue
            if not _matches(name, config.include):
                skipped[name] = "not matched by quantize.include"
                continue
            if _matches(name, config.exclude):
                skipped[name] = "excluded by quantize.exclude"
                continue
            if min_macs and config.activation is not None:
                macs = layer_macs(node)
                if macs is not None and macs < min_macs:
                    skipped[name] = (f"int8 is slower than float for layers under {min_macs} MACs on "
                                     f"{target.variant} (tools/cpu_layer_costs.py); this one has {macs}")
                    continue
            found = cls._weight_of(node)
            if isinstance(found, str):
                if config.activation is None or node.op_type != "MatMul":
                    skipped[name] = found
                    continue
                weight_index, axis = None, None  # MatMul of two activations: both quantized
            else:
                weight_index, axis = found
            acts = tuple(v for i, v in enumerate(node.inputs[:2]) if v is not None and i != weight_index
                         and v.const_value is None)
            out = node.outputs[0]
            folded = None
            if config.activation is not None and config.fold_activations and not symmetric:
                users = out.uses()
                if len(users) == 1 and out not in outputs:
                    user = users[0].node
                    if user.op_type in _FOLDABLE_ACTIVATIONS and user.outputs[0] not in outputs \
                            and _clip_floor_is_zero(user):
                        folded = user
            plans.append(LayerPlan(node, weight_index, axis, acts, folded.outputs[0] if folded else out, folded))
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
        if config.activation is None:
            return set()
        plans, _ = cls.plan(model, config, ctx.target)
        return {v.name for p in plans for v in (*p.activations, p.output)}

    # -- rewriting ----------------------------------------------------------------
    def _activation_params(self, value: ir.Value, dtype: str) -> tuple[np.ndarray, np.ndarray] | str:
        stats = self.ctx.stats.get(value.name)
        if stats is None or stats.count == 0:
            return f"no calibration range for tensor {value.name!r}"
        cal = self.ctx.calibration
        symmetric = activation_symmetric(self.config, self.ctx.target)
        lo, hi = stats.range(cal.method, percentile=cal.percentile, dtype=dtype, symmetric=symmetric)
        return compute_qparams(lo, hi, dtype, symmetric=symmetric)

    def run(self, model: ir.Model) -> bool:
        cfg, ctx = self.config, self.ctx
        graph = model.graph
        plans, skipped = self.plan(model, cfg, ctx.target)
        act_dtype = None
        if cfg.activation is not None:
            act_dtype = cfg.activation.dtype
            if act_dtype == "auto":
                act_dtype = ctx.target.setting("activation_dtype", "uint8")
        # Activation params for every tensor first: one Q/DQ pair per tensor.
        act_params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        usable = []
        for p in plans:
            if act_dtype is not None:
                problems = []
                for v in (*p.activations, p.output):
                    if v.name not in act_params:
                        params = self._activation_params(v, act_dtype)
                        if isinstance(params, str):
                            problems.append(params)
                        else:
                            act_params[v.name] = params
                if problems:
                    skipped[p.node.name] = problems[0]
                    continue
            usable.append(p)
        quantized_weights: dict[str, ir.Value] = {}
        weight_scales: dict[str, np.ndarray] = {}
        act_tensors: dict[str, ir.Value] = {}
        for p in usable:
            node = p.node
            record = {"op": node.op_type, "status": "quantized",
                      "weight": None, "activation": act_dtype or "float",
                      # read now: a ReLU folded upstream has already rewired this input
                      "input_tensor": next((v.name for v in node.inputs[:2]
                                            if v is not None and v.const_value is None), None),
                      "output_tensor": node.outputs[0].name}
            if p.weight_index is not None:
                w_val = node.inputs[p.weight_index]
                granularity = weight_granularity(cfg, ctx.target, node.op_type)
                if w_val.name not in quantized_weights:
                    q_out, w_scale = self._quantize_weight(graph, w_val, p.axis, granularity)
                    quantized_weights[w_val.name], weight_scales[w_val.name] = q_out, w_scale
                node.replace_input_with(p.weight_index, quantized_weights[w_val.name])
                w_scale = weight_scales[w_val.name]
                record["weight"] = f"{cfg.weight.dtype} {granularity}"
                bias = node.inputs[2] if len(node.inputs) > 2 and node.op_type in ("Conv", "Gemm") else None
                if bias is not None and act_dtype is not None and p.activations:
                    note = self._quantize_bias(graph, node, bias, act_params[p.activations[0].name][0], w_scale)
                    if note:
                        record["note"] = note
            if p.folded is not None:
                folded_out = p.folded.outputs[0]
                folded_out.replace_all_uses_with(node.outputs[0])
                graph.remove(p.folded, safe=True)
                record["folded"] = p.folded.op_type
            if act_dtype is not None:
                for v in p.activations:
                    act_tensors.setdefault(v.name, v)
                act_tensors.setdefault(p.output.name, node.outputs[0] if p.folded is not None else p.output)
            ctx.layers[node.name] = record
        conv_outputs = {p.node.outputs[0].name for p in usable if p.node.op_type == "Conv"}
        for name, value in act_tensors.items():
            scale, zp = act_params[name]
            insert_qdq(graph, value, scale, zp,
                       through_graph_output=cfg.quantize_graph_outputs and value.name in conv_outputs)
        for name, reason in skipped.items():
            ctx.layers[name] = {"status": "float", "reason": reason}
        graph.sort()
        common_passes.RemoveUnusedNodesPass()(model)  # drops the float weights now unused
        ctx.report["quantize"] = {"quantized": len(usable), "float": len(skipped),
                                  "activation_dtype": act_dtype, "activation_tensors": len(act_tensors)}
        return bool(usable)

    def _quantize_weight(self, graph: ir.Graph, w_val: ir.Value, axis: int | None, granularity: str):
        scheme = self.config.weight
        w = w_val.const_value.numpy().astype(np.float32)
        axis = axis if granularity == "per_channel" else None
        lo, hi = reduce_absmax(w, axis)
        scale, zp = compute_qparams(lo, hi, scheme.dtype, symmetric=scheme.symmetric, restricted=True,
                                    reduce_range=scheme.reduce_range)
        q = quantize(w, scale, zp, scheme.dtype, axis=axis)
        out = store_weight_quantized(graph, w_val, q, scale, zp, axis)
        return out, scale

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


def weight_granularity(config, target, op_type: str) -> str:
    """The recipe's weight granularity, unless the target takes this op's weights per-tensor
    only (its `per_tensor_weight_ops`, e.g. Ascend: Gemm and MatMul)."""
    if target is not None and op_type in (target.setting("per_tensor_weight_ops") or ()):
        return "per_tensor"
    return config.weight.granularity


def activation_symmetric(config, target) -> bool:
    """The recipe's choice, or with `auto` the target's (cpu: asymmetric uint8)."""
    act = config.activation
    if act is None:
        return False
    if act.symmetric == "auto":
        return bool(target.setting("activation_symmetric", False)) if target is not None else False
    return bool(act.symmetric)


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
