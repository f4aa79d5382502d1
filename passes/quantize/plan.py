"""Planning: which Conv/MatMul/Gemm layers get quantized with which scheme, and why every other
candidate stays float — decided from the graph, the recipe's scopes and the target alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.analyses import RangeRequest
from qcompile.errors import RecipeError
from qcompile.schemes import ActivationScheme, Scheme, WeightScheme

from ..scope import feeds_model_output, matches
from .config import QuantizeConfig, scheme_for

LAYER_OPS = ("Conv", "MatMul", "Gemm")
_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")


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
        """Activations quantized at run time by nodes in the graph (the integer-op path)."""
        act = self.scheme.activation
        return act is not None and act.is_dynamic and not act.in_kernel

    @property
    def in_kernel(self) -> bool:
        """Activations quantized inside the target's matmul kernel: the graph holds only the
        weight's DequantizeLinear (as weight-only), the lowering picks the int8-compute kernel."""
        act = self.scheme.activation
        return act is not None and act.in_kernel


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def plan_layers(model: ir.Model, config: QuantizeConfig, target=None) -> tuple[list[LayerPlan], dict[str, str]]:
    """(the layers to quantize, {layer: why it stays float} for the other candidates)."""
    plans, skipped = [], {}
    min_macs = target.setting("int8_min_macs") if (target is not None and config.speed_fallback) else None
    outputs = set(model.graph.outputs)
    for node in model.graph:
        if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
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
        scheme, chosen_by = scheme_for(config, name, output_layer=feeds_model_output(node, outputs))
        if scheme.is_float:
            skipped[name] = f"{chosen_by}: float"
            continue
        act = scheme.activation
        static = act is not None and not act.is_dynamic
        if min_macs and static and act.dtype in ("auto", "int8", "uint8"):
            macs = layer_macs(node)
            if macs is not None and macs < min_macs:
                skipped[name] = (f"int8 is slower than float for layers under {min_macs} MACs on "
                                 f"{target.variant} (tools/cpu_layer_costs.py); this one has {macs}")
                continue
        found = weight_of(node)
        if not isinstance(found, str) and reduction_size(node, found[0]) == 1:
            skipped[name] = ("an outer product (reduction dimension 1), not a layer: e.g. a rotary table's "
                             "positions x frequencies, whose phases quantization would shift")
            continue
        if isinstance(found, str):
            if not static or node.op_type != "MatMul":
                skipped[name] = found
                continue
            if target is not None and not target.setting("quantize_activation_products", True):
                skipped[name] = (f"a product of two activations (attention's Q·Kᵀ or P·V): {target.name}'s placement "
                                 "keeps it float (its descriptor's quantize_activation_products)")
                continue
            weight_index, axis = None, None  # MatMul of two activations: both quantized
        else:
            weight_index, axis = found
        acts = tuple(v for i, v in enumerate(node.inputs[:2]) if v is not None and i != weight_index
                     and v.const_value is None)
        # the target's placement may keep layer outputs unquantized (TensorRT: Q/DQ on inputs only)
        outputs_quantized = target is None or target.setting("quantize_layer_outputs", True)
        out = node.outputs[0] if (static and outputs_quantized
                                  and (node.op_type == "Conv" or config.output_quantization == "all")) else None
        folded = None
        if out is not None and config.fold_activations and not activation_symmetric(act, target) \
                and act.dtype in ("auto", "uint8", "uint4"):
            users = out.uses()
            if len(users) == 1 and out not in outputs:
                user = users[0].node
                if user.op_type in _FOLDABLE_ACTIVATIONS and user.outputs[0] not in outputs \
                        and _clip_floor_is_zero(user):
                    folded = user
        plans.append(LayerPlan(node, scheme, weight_index, axis, acts, folded.outputs[0] if folded else out, folded))
    if config.fallback.max_layers > len(plans):
        raise RecipeError(f"fallback.max_layers is {config.fallback.max_layers}, but this model has only "
                          f"{len(plans)} layers to quantize", pass_name="quantize", key="fallback.max_layers")
    return plans, skipped


def wants_ranges(model: ir.Model, config: QuantizeConfig, target,
                 plans: list[LayerPlan] | None = None) -> RangeRequest:
    """Static layers' inputs and quantized outputs; with bias correction, per-channel input means
    too; with the concat guard, the parts of a concatenated input. `plans`: plan_layers' when
    the caller has them."""
    if plans is None:
        plans, _ = plan_layers(model, config, target)
    wanted = {v.name for p in plans if p.static for v in (*p.activations, p.output) if v is not None}
    axes = {}
    if config.bias_correction:
        for p in plans:
            if p.static and p.weight_index is not None and p.activations:
                axes[p.activations[0].name] = 1 if p.node.op_type == "Conv" else -1
    if config.range_guard.concat_ratio:
        wanted |= {part.name for p in plans if p.static for v in p.activations for part in concat_parts(v)}
    return RangeRequest(frozenset(wanted), axes)


def weight_of(node: ir.Node) -> tuple[int, int] | str:
    """(input index, per-channel axis) of the constant weight, or why there is none."""
    if node.op_type == "Conv":
        w = node.inputs[1]
        return (1, 0) if w is not None and w.const_value is not None else "Conv weight is not a constant"
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with alpha/beta != 1 (int32 bias needs beta = 1)"
        if attrs.get_int("transA", 0):
            return "Gemm with transA"
        if node.inputs[1] is None or node.inputs[1].const_value is None:
            return "Gemm B is not a constant"
        return (1, 0 if attrs.get_int("transB", 0) else 1)
    # MatMul: weight is the constant right-hand side, per output column.
    w = node.inputs[1].const_value if node.inputs[1] is not None else None   # its shape: the data stays where it is
    if w is None:
        return "MatMul has no constant weight"
    if len(w.shape) != 2:   # a batched (3-D+) or vector weight: no int8 MatMul kernel takes it as a linear layer
        return f"MatMul weight of rank {len(w.shape)}, not a 2-D linear weight"
    return (1, 1)


def reduction_size(node: ir.Node, weight_index: int) -> int | None:
    """K, the length a MatMul/Gemm/Conv sums over, from its constant weight (None if unknown)."""
    w = node.inputs[weight_index].const_value
    if w is None or not w.shape:
        return None
    shape = list(w.shape)
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    if node.op_type == "Gemm":
        return shape[1] if node.attributes.get_int("transB", 0) else shape[0]
    return shape[-2] if len(shape) >= 2 else None


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


def concat_parts(value: ir.Value) -> list[ir.Value]:
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
    lo = const(node.inputs[1]) if len(node.inputs) > 1 else None
    return lo is not None and float(lo) == 0.0
