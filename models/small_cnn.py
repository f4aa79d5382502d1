"""A small seeded CNN (Conv+BN+ReLU, strided Conv, depthwise+ReLU6, 1x1, GAP, Gemm)
in the shape of a mobile classifier: the bundled default model for the demo and
the end-to-end tests. Built with onnx helpers; no torch.

    python models/small_cnn.py OUT_DIR   # writes small_cnn.onnx, calib.npz, eval.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# 96x96 puts most convs over the cpu target's int8_min_macs (1M): the depthwise conv and the
# classifier stay float, which the demo shows as "int8 would be slower" decisions.
SIZE = 96


def _conv_weight(rng, cout, cin, k):
    fan_in = cin * k * k
    return (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def build(seed: int = 0, size: int = SIZE) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    # stem: Conv 3->16 + BatchNorm + ReLU
    nodes.append(helper.make_node("Conv", ["x", init("stem.w", _conv_weight(rng, 16, 3, 3))], ["stem.conv"],
                                  name="/stem/conv/Conv", pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node(
        "BatchNormalization",
        ["stem.conv", init("bn.scale", rng.uniform(0.5, 1.5, 16)), init("bn.bias", rng.normal(0, 0.1, 16)),
         init("bn.mean", rng.normal(0, 0.1, 16)), init("bn.var", rng.uniform(0.5, 2.0, 16))],
        ["stem.bn"], name="/stem/bn/BatchNormalization"))
    nodes.append(helper.make_node("Relu", ["stem.bn"], ["stem.out"], name="/stem/relu/Relu"))
    # down: Conv 16->32 stride 2 + ReLU
    nodes.append(helper.make_node("Conv", ["stem.out", init("down.w", _conv_weight(rng, 32, 16, 3)),
                                           init("down.b", rng.normal(0, 0.05, 32))], ["down.conv"],
                                  name="/down/conv/Conv", pads=[1, 1, 1, 1], strides=[2, 2]))
    nodes.append(helper.make_node("Relu", ["down.conv"], ["down.out"], name="/down/relu/Relu"))
    # depthwise 3x3 + ReLU6
    nodes.append(helper.make_node("Conv", ["down.out", init("dw.w", _conv_weight(rng, 32, 1, 3)),
                                           init("dw.b", rng.normal(0, 0.05, 32))], ["dw.conv"],
                                  name="/dw/conv/Conv", pads=[1, 1, 1, 1], group=32))
    nodes.append(helper.make_node("Clip", ["dw.conv", init("six.lo", 0.0), init("six.hi", 6.0)], ["dw.out"],
                                  name="/dw/relu6/Clip"))
    # pointwise 1x1 32->64, residual-free, then GAP + Flatten + Gemm
    nodes.append(helper.make_node("Conv", ["dw.out", init("pw.w", _conv_weight(rng, 64, 32, 1)),
                                           init("pw.b", rng.normal(0, 0.05, 64))], ["pw.conv"],
                                  name="/pw/conv/Conv"))
    nodes.append(helper.make_node("Relu", ["pw.conv"], ["pw.out"], name="/pw/relu/Relu"))
    nodes.append(helper.make_node("GlobalAveragePool", ["pw.out"], ["gap"], name="/head/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="/head/Flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", init("fc.w", rng.standard_normal((10, 64)) * 0.2),
                                           init("fc.b", rng.normal(0, 0.1, 10))], ["logits"],
                                  name="/head/fc/Gemm", transB=1))
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcompile-models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Smooth, image-like inputs (blurred noise plus gradients), normalised."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    up = base.repeat(size // 8, axis=2).repeat(size // 8, axis=3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    up += rng.uniform(-1, 1, (n, 3, 1, 1)).astype(np.float32) * ramp[None, None, :, None]
    up += 0.1 * rng.standard_normal(up.shape).astype(np.float32)
    return up.astype(np.float32)


def write(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / "small_cnn.onnx", "calib": out / "calib.npz", "eval": out / "eval.npz"}
    onnx.save(build(seed), paths["model"])
    np.savez(paths["calib"], x=images(32, seed + 1))
    np.savez(paths["eval"], x=images(64, seed + 2))
    return paths


if __name__ == "__main__":
    for kind, path in write(sys.argv[1] if len(sys.argv) > 1 else "build/demo").items():
        print(f"{kind}: {path}")
