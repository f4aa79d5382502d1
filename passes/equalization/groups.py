"""Groups of linears that read one activation X, and where a per-channel division of X can go.

SmoothQuant and AWQ both scale input channel j of every weight reading X by s_j and divide X
by s_j; the group's `kind` says who absorbs the division (see `fold_division`):

* `norm-linear`: X comes from LayerNormalization/RMSNorm with constant γ (and β): γ/s, β/s —
  spelled out or fused (onnxruntime's SimplifiedLayerNormalization, and the Skip* forms whose
  first output is the normalized sum);
* `linear-linear`: X comes from a MatMul/Gemm with a constant weight (optionally + a constant
  bias): that weight's output columns and the bias are divided by s;
* `affine-linear` / `affine-conv`: X = y·a (+ b) with constant a (and b), one value or one per
  channel, read by MatMul/Gemm or by Conv layers (X's channel axis 1): a/s and b/s;
* `gated-linear`: X = a ⊙ L(z), an elementwise product one of whose factors comes from a linear
  with a constant weight (a gated MLP: SwiGLU's silu(gate) ⊙ up feeding down_proj): that
  linear's output columns (and bias) are divided by s, since the product is linear in it;
* `explicit-mul`: a Mul(X, 1/s) in front of the group only (when the search allows it) —
  for activation quantization (SmoothQuant) not after an activation function (an FFN's down
  projection after GELU/ReLU): on MiniLM that Mul lowered W8A8's SQNR from 18.7 to 9.9 dB
  although each layer's simulated error fell, so such a group is left alone there (a gated
  MLP's down projection folds into its up projection instead: `gated-linear`);
* None: nothing can absorb it, and `reason` says why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.qdq import add_initializer, set_constant_input

from ..conv_patches import ConvGeometry
from ..scope import in_scope
from .channels import channel_shaped, per_channel_shape, times_channels

# norm op -> input indices of its scale γ and shift β (None: it has none)
# activation functions (fused or plain) after which no Mul is inserted (see `explicit-mul`)
_ACTIVATIONS = ("Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu",
                "Selu", "HardSigmoid", "HardSwish", "Softplus", "Mish", "Clip")
# the nonlinearity inside an activation function spelled out in elementwise ops: GELU's
# x·0.5·(1 + erf(x/√2)) (or its tanh form), SiLU/Swish's x·sigmoid(x), HardSwish's x·hardsigmoid(x)
_ACTIVATION_CORES = ("Erf", "Tanh", "Sigmoid", "HardSigmoid")
_NORMS = {"LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1, None), "RMSNormalization": (1, None),
          "SkipLayerNormalization": (2, 3), "SkipSimplifiedLayerNormalization": (2, None)}


@dataclasses.dataclass
class Linear:
    node: ir.Node
    weight: ir.Value
    k_axis: int           # the weight axis indexed by X's channels
    conv: ConvGeometry | None = None    # Conv consumers: X is NCHW, the weight [Cout, Cin/g, kh, kw]

    @property
    def groups(self) -> int | None:
        """The Conv's groups (None for MatMul/Gemm), as channels.py takes them."""
        return self.conv.groups if self.conv is not None else None


@dataclasses.dataclass
class Group:
    x: ir.Value
    linears: list[Linear]
    kind: str | None = None      # norm-linear | linear-linear | affine-* | explicit-mul; None: cannot fold
    reason: str = ""
    producer: ir.Node | None = None
    bias_add: ir.Node | None = None
    gate: ir.Node | None = None   # gated-linear: the Mul forming X (the producer is the linear feeding it)

    def rescaled(self) -> list[ir.Value]:
        """Tensors the folded division leaves divided by s along the channel axis: X, and for a
        gated group also the linear's output that carries the division into the product."""
        extra = [self.gate.inputs[0] if self.gate.inputs[0].producer() in (self.producer, self.bias_add)
                 else self.gate.inputs[1]] if self.kind == "gated-linear" else []
        return [self.x, *extra]

    @property
    def convs(self) -> bool:
        return self.linears[0].conv is not None

    @property
    def channel_axis(self) -> int:
        return 1 if self.convs else -1


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def find_groups(model: ir.Model, config, *, mul_after_activation: bool = True) -> list[Group]:
    """Every activation read by in-scope linears, classified by what can absorb 1/s. `config`
    is the searching pass's: `include`/`exclude`, `kinds`, `explicit_mul`; without
    `mul_after_activation` no Mul is inserted after an activation function (see `explicit-mul`)."""
    by_x: dict[str, Group] = {}
    convs = "affine-conv" in config.kinds
    for node in model.graph:
        lin = linear_of(node, convs=convs)
        if lin is None or not in_scope(node.name, config):
            continue
        x = node.inputs[0]
        if x is None or x.const_value is not None:
            continue
        by_x.setdefault(x.name, Group(x, [])).linears.append(lin)
    outputs = set(model.graph.outputs)
    for group in by_x.values():
        if len({lin.conv is None for lin in group.linears}) > 1:
            group.reason = "read by both Conv and MatMul/Gemm layers"
            continue
        _classify(group, config, outputs, mul_after_activation)
    return list(by_x.values())


def linear_of(node: ir.Node, convs: bool = False) -> Linear | None:
    """A MatMul/Gemm whose input 1 is a constant 2-D weight, with the axis X's channels index;
    with `convs`, also a 2-D Conv with a constant weight."""
    ops = ("MatMul", "Gemm", "Conv") if convs else ("MatMul", "Gemm")
    if node.domain not in ("", "ai.onnx") or node.op_type not in ops or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if node.op_type == "Conv":
        geo = ConvGeometry.of(node, w.const_value.shape) if w is not None and w.const_value is not None else None
        return Linear(node, w, 1, geo) if geo is not None else None
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return Linear(node, w, 1 if node.attributes.get_int("transB", 0) else 0)
    return Linear(node, w, 0)


def _only_group_uses(x: ir.Value, group: Group, outputs: set) -> bool:
    members = {id(lin.node) for lin in group.linears}
    return x not in outputs and all(id(u.node) in members and u.idx == 0 for u in x.uses())


def _classify(group: Group, config, outputs: set, mul_after_activation: bool) -> None:
    x = group.x
    producer = x.producer()
    exclusive = _only_group_uses(x, group, outputs)
    if producer is not None and producer.op_type in _NORMS and "norm-linear" in config.kinds and not group.convs \
            and x is producer.outputs[0]:
        at = _NORMS[producer.op_type][0]
        gamma = producer.inputs[at] if len(producer.inputs) > at else None
        if exclusive and _const(gamma) is not None and producer.attributes.get_int("axis", -1) in (-1, len(x.shape or ()) - 1):
            group.kind, group.producer = "norm-linear", producer
            return
        why = "the norm's output also feeds other nodes" if not exclusive else "the norm's scale is not constant"
    elif producer is not None and "linear-linear" in config.kinds and not group.convs and \
            _linear_producer(group, producer):
        if exclusive:
            group.kind = "linear-linear"
            return
        why = "the producing linear's output also feeds other nodes"
    elif producer is not None and "gated-linear" in config.kinds and not group.convs and \
            _gated_producer(group, producer):
        if exclusive:
            group.kind = "gated-linear"
            return
        why = "the gated product also feeds other nodes"
    elif producer is not None and _affine_producer(group, producer, x):
        kind = "affine-conv" if group.convs else "affine-linear"
        if exclusive and kind in config.kinds:
            group.kind = kind
            return
        why = "the affine's output also feeds other nodes" if not exclusive else f"kind {kind!r} is not in kinds"
    else:
        why = f"produced by {producer.op_type if producer is not None else 'a graph input'}, which cannot absorb a scale"
    if producer is not None and is_activation(producer) and not mul_after_activation:
        group.reason = (f"{why}; no Mul is inserted after an activation function (an FFN down projection: "
                        "measured to hurt the model although the layer's simulated error fell)")
        return
    if config.explicit_mul:
        group.kind, group.reason = "explicit-mul", why
    else:
        group.reason = why + " (explicit_mul: true would insert a Mul)"


def is_activation(node: ir.Node, depth: int = 3) -> bool:
    """An activation function: one op (Gelu, Relu, ...), or the last Mul of one spelled out in
    elementwise ops — GELU exported unfused (a target whose `fuse` leaves it, e.g. cuda) is
    Mul(Mul(x, 0.5), Add(Erf(x/√2), 1)): an Erf/Tanh/Sigmoid within `depth` producers of the Mul."""
    if node.op_type in _ACTIVATIONS:
        return True
    if node.op_type != "Mul":
        return False
    frontier, seen = [node], set()
    for _ in range(depth):
        frontier = [v.producer() for n in frontier for v in n.inputs if v is not None and v.producer() is not None]
        frontier = [n for n in frontier if id(n) not in seen and not seen.add(id(n))]
        if any(n.op_type in _ACTIVATION_CORES for n in frontier):
            return True
    return False


def _linear_producer(group: Group, producer: ir.Node) -> bool:
    """X = MatMul/Gemm(const W) or Add(MatMul(const W), const bias) with a single use."""
    bias_add = None
    if producer.op_type == "Add":
        a, b = producer.inputs
        inner = a.producer() if a is not None and _const(b) is not None else None
        if inner is None or len(a.uses()) != 1:
            return False
        bias_add, producer = producer, inner
    lin = linear_of(producer)
    if lin is None:
        return False
    group.producer, group.bias_add = producer, bias_add
    return True


def _gated_producer(group: Group, producer: ir.Node) -> bool:
    """X = Mul(a, b), neither factor constant, where a factor is a linear's output (optionally
    + a constant bias) read by nothing else and of X's shape (no broadcast along the channels)."""
    if producer.op_type != "Mul" or any(v is None or v.const_value is not None for v in producer.inputs):
        return False
    for factor in producer.inputs:
        inner = factor.producer()
        if inner is None or len(factor.uses()) != 1 or factor.shape is None or group.x.shape is None \
                or list(factor.shape)[-1:] != list(group.x.shape)[-1:]:
            continue
        if _linear_producer(group, inner):
            group.gate = producer
            return True
    group.producer = group.bias_add = None
    return False


def _affine_producer(group: Group, producer: ir.Node, x: ir.Value) -> bool:
    """X = Mul(y, a) or Add(Mul(y, a), b), a and b constants of one value or one per channel of X
    (they must stay that size once divided by a per-channel s); the Mul's output used once."""
    bias_add, mul = None, producer
    if producer.op_type == "Add":
        a, b = producer.inputs
        const_idx = 1 if _const(b) is not None else 0 if _const(a) is not None else None
        if const_idx is None:
            return False
        inner = producer.inputs[1 - const_idx]
        mul = inner.producer()
        if mul is None or len(inner.uses()) != 1:
            return False
        bias_add = producer
    if mul.op_type != "Mul" or sum(_const(v) is not None for v in mul.inputs) != 1:
        return False
    rank = len(x.shape) if x.shape is not None else None
    if rank is None:
        return False
    consts = [_const(v) for v in list(mul.inputs) + (list(bias_add.inputs) if bias_add else [])]
    if not all(per_channel_shape(c, rank, group.channel_axis) for c in consts if c is not None):
        return False
    group.producer, group.bias_add = mul, bias_add
    return True


def fold_division(graph: ir.Graph, g: Group, s: np.ndarray) -> None:
    """Divide X by s where the group's kind says: the norm's γ/β, the producer's weight/bias, the
    affine's a/b, or a Mul."""
    if g.kind == "norm-linear":
        for idx in _NORMS[g.producer.op_type]:
            v = g.producer.inputs[idx] if idx is not None and len(g.producer.inputs) > idx else None
            arr = _const(v)
            if arr is not None:
                set_constant_input(graph, g.producer, idx, (arr / s).astype(arr.dtype))
        return
    if g.kind in ("affine-linear", "affine-conv"):
        rank = len(g.x.shape)
        s_shaped = channel_shaped(s, rank, g.channel_axis)
        for node in (g.producer, g.bias_add):
            if node is None:
                continue
            idx = 1 if _const(node.inputs[1]) is not None else 0
            set_constant_input(graph, node, idx, times_channels(_const(node.inputs[idx]), 1.0 / s_shaped, rank))
        return
    if g.kind in ("linear-linear", "gated-linear"):
        lin = linear_of(g.producer)
        w = lin.weight.const_value.numpy().astype(np.float32)
        out_axis = 1 - lin.k_axis  # the producer's output channels
        shape = [1, 1]
        shape[out_axis] = -1
        set_constant_input(graph, g.producer, 1, (w / s.reshape(shape)).astype(np.float32))
        if g.producer.op_type == "Gemm" and len(g.producer.inputs) > 2 and _const(g.producer.inputs[2]) is not None:
            b = _const(g.producer.inputs[2])
            set_constant_input(graph, g.producer, 2, (b / s).astype(b.dtype))
        if g.bias_add is not None:
            idx = 1 if _const(g.bias_add.inputs[1]) is not None else 0
            b = _const(g.bias_add.inputs[idx])
            set_constant_input(graph, g.bias_add, idx, (b / s).astype(b.dtype))
        return
    rank = len(g.x.shape) if g.x.shape is not None else (4 if g.convs else 1)
    inv = add_initializer(graph, f"{g.x.name}_smooth_inv_scale",
                          channel_shaped((1.0 / s).astype(np.float32), rank, g.channel_axis))
    mul = ir.node("Mul", [g.x, inv], name=f"{g.linears[0].node.name}_smooth/Mul")
    mul.outputs[0].name = f"{g.x.name}_smoothed"
    mul.outputs[0].dtype, mul.outputs[0].shape = g.x.dtype, g.x.shape
    graph.insert_after(g.x.producer(), mul) if g.x.producer() is not None else graph.insert_before(
        g.linears[0].node, mul)
    for lin in g.linears:
        lin.node.replace_input_with(0, mul.outputs[0])
