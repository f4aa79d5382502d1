"""Random valid ONNX graphs for property tests of the float-preserving passes.

A graph is built from a *spec*: an input kind (image or token sequence), an opset and a list
of blocks, each drawn from a seeded generator — Conv (k 1/3, grouped, depthwise, strided),
BatchNorm, activations (Relu, Clip 0..6, HardSwish, Sigmoid, LeakyRelu), residual Add, a
two-branch Concat, per-channel Mul/Add by constants, Reshape/Transpose round trips, Gemm and
MatMul(+Add) linears, LayerNormalization (opset >= 17), Softmax-attention-like MatMul chains.
Weights are random with a few outlier channels (what equalization acts on). The spec is a
list, so a failing graph is minimised by dropping blocks (`minimise`).

    spec = random_spec(seed); model, data = build(spec)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IMAGE_BLOCKS = ("conv", "conv_bn_act", "depthwise", "residual", "concat", "channel_affine", "act", "reshape_roundtrip",
                "strided")
SEQ_BLOCKS = ("linear", "linear_act", "gemm", "layernorm", "residual_linear", "attention", "channel_affine", "act")


@dataclasses.dataclass
class Spec:
    seed: int
    kind: str                    # image | seq
    opset: int
    blocks: list[str]
    channels: int
    size: int                    # H = W for images, T for sequences

    def describe(self) -> str:
        return f"seed {self.seed}: {self.kind} opset {self.opset} C={self.channels} size={self.size} {self.blocks}"


def random_spec(seed: int) -> Spec:
    rng = np.random.default_rng(seed)
    kind = "image" if rng.random() < 0.6 else "seq"
    opset = int(rng.choice([13, 15, 17, 18, 20]))
    pool = IMAGE_BLOCKS if kind == "image" else SEQ_BLOCKS
    blocks = [str(rng.choice(pool)) for _ in range(int(rng.integers(2, 7)))]
    if opset < 17:
        blocks = [b if b != "layernorm" else "linear" for b in blocks]
    return Spec(seed, kind, opset, blocks, int(rng.choice([4, 8, 12, 16])), int(rng.choice([6, 8, 12])))


class _Builder:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed + 7919)
        self.nodes, self.inits = [], []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def const_i64(self, values, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    def weight(self, shape, fan_in: int) -> np.ndarray:
        w = self.rng.standard_normal(shape) / np.sqrt(fan_in)
        if self.rng.random() < 0.5:   # a few outlier output channels
            rows = self.rng.choice(shape[0], size=max(1, shape[0] // 8), replace=False)
            w[rows] *= self.rng.uniform(4, 12)
        return w

    # -- image blocks (x: [1, C, H, W]) --------------------------------------------------------
    def conv(self, x, c, k=3, group=1, stride=1):
        w = self.const(self.weight((c, c // group, k, k), c // group * k * k), "w")
        b = self.const(self.rng.standard_normal(c) * 0.1, "b")
        return self.node("Conv", [x, w, b], kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def act(self, x):
        choice = self.rng.choice(["Relu", "Clip", "HardSwish", "Sigmoid", "LeakyRelu"]
                                 if self.spec.opset >= 14 else ["Relu", "Clip", "Sigmoid", "LeakyRelu"])
        if choice == "Clip":
            return self.node("Clip", [x, self.const(np.array(0.0), "lo"), self.const(np.array(6.0), "hi")])
        if choice == "LeakyRelu":
            return self.node("LeakyRelu", [x], alpha=0.1)
        return self.node(str(choice), [x])

    def bn(self, x, c):
        return self.node("BatchNormalization", [x, self.const(self.rng.uniform(0.5, 2, c), "g"),
                                                 self.const(self.rng.standard_normal(c) * 0.1, "be"),
                                                 self.const(self.rng.standard_normal(c) * 0.1, "m"),
                                                 self.const(self.rng.uniform(0.5, 2, c), "v")], epsilon=1e-5)

    def channel_affine(self, x, c, shape):
        scale = self.const(self.rng.uniform(0.2, 3, c).reshape(shape), "s")
        shift = self.const(self.rng.standard_normal(c).reshape(shape) * 0.1, "t")
        return self.node("Add", [self.node("Mul", [x, scale]), shift])

    # -- sequence blocks (x: [1, T, D]) --------------------------------------------------------
    def linear(self, x, d, bias=True):
        y = self.node("MatMul", [x, self.const(self.weight((d, d), d).T, "wl")])
        return self.node("Add", [y, self.const(self.rng.standard_normal(d) * 0.1, "bl")]) if bias else y

    def gemm(self, x, d, t):
        flat = self.node("Reshape", [x, self.const_i64([t, d], "shape")])
        y = self.node("Gemm", [flat, self.const(self.weight((d, d), d), "wg"), self.const(self.rng.standard_normal(d) * 0.1, "bg")],
                      transB=1)
        return self.node("Reshape", [y, self.const_i64([1, t, d], "shape")])

    def layernorm(self, x, d):
        return self.node("LayerNormalization", [x, self.const(self.rng.uniform(0.5, 2, d), "ln_g"),
                                                 self.const(self.rng.standard_normal(d) * 0.1, "ln_b")], axis=-1)

    def attention(self, x, d):
        q, k, v = (self.linear(x, d, bias=False) for _ in range(3))
        kt = self.node("Transpose", [k], perm=[0, 2, 1])
        scores = self.node("Mul", [self.node("MatMul", [q, kt]), self.const(np.array(1 / np.sqrt(d)), "sc")])
        probs = self.node("Softmax", [scores], axis=-1)
        return self.linear(self.node("MatMul", [probs, v]), d)


def build(spec: Spec) -> tuple[onnx.ModelProto, np.ndarray]:
    """The graph of `spec` and 8 samples of its input (x, batch on axis 0)."""
    b = _Builder(spec)
    c, s = spec.channels, spec.size
    x = "x"
    if spec.kind == "image":
        shape, cshape = [1, c, s, s], (1, c, 1, 1)
        for block in spec.blocks:
            if block == "conv":
                x = b.conv(x, c, k=int(b.rng.choice([1, 3])))
            elif block == "conv_bn_act":
                x = b.act(b.bn(b.conv(x, c), c))
            elif block == "depthwise":
                x = b.act(b.conv(x, c, group=c))
            elif block == "strided":
                if s >= 4:
                    x = b.conv(x, c, stride=2)
                    s = (s + 1) // 2
            elif block == "residual":
                x = b.node("Add", [x, b.act(b.conv(x, c))])
            elif block == "concat":
                half = b.node("Concat", [b.conv(x, c, k=1), b.act(b.conv(x, c))], axis=1)
                w = b.const(b.weight((c, 2 * c, 1, 1), 2 * c), "wc")
                x = b.node("Conv", [half, w], kernel_shape=[1, 1])
            elif block == "channel_affine":
                x = b.channel_affine(x, c, cshape)
            elif block == "act":
                x = b.act(x)
            elif block == "reshape_roundtrip":
                flat = b.node("Reshape", [x, b.const_i64([1, c, s * s], "shape")])
                back = b.node("Transpose", [b.node("Transpose", [flat], perm=[0, 2, 1])], perm=[0, 2, 1])
                x = b.node("Reshape", [back, b.const_i64([1, c, s, s], "shape")])
        out_shape = [1, c, s, s]
    else:
        t, d = s, c * 4
        shape, out_shape = [1, t, d], [1, t, d]
        for block in spec.blocks:
            if block == "linear":
                x = b.linear(x, d)
            elif block == "linear_act":
                x = b.act(b.linear(x, d))
            elif block == "gemm":
                x = b.gemm(x, d, t)
            elif block == "layernorm":
                x = b.layernorm(x, d)
            elif block == "residual_linear":
                x = b.node("Add", [x, b.linear(b.act(b.linear(x, d)), d)])
            elif block == "attention":
                x = b.node("Add", [x, b.attention(b.layernorm(x, d) if spec.opset >= 17 else x, d)])
            elif block == "channel_affine":
                x = b.channel_affine(x, d, (d,))
            elif block == "act":
                x = b.act(x)
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="/out/Identity"))
    graph = helper.make_graph(b.nodes, f"random_{spec.seed}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], producer_name="random_graphs")
    model.ir_version = 8
    data = np.random.default_rng(spec.seed).standard_normal((8, *shape[1:])).astype(np.float32)
    return model, data


def minimise(spec: Spec, fails) -> Spec:
    """The smallest block list (dropping one block at a time) for which `fails(spec)` still holds."""
    changed = True
    while changed and len(spec.blocks) > 1:
        changed = False
        for i in range(len(spec.blocks)):
            smaller = dataclasses.replace(spec, blocks=spec.blocks[:i] + spec.blocks[i + 1:])
            if fails(smaller):
                spec, changed = smaller, True
                break
    return spec
