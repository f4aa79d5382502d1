"""Where does an int8 layer stop paying off on this CPU?

Times one Conv (and one MatMul) in onnxruntime CPU, float vs the QDQ form qcompile
emits (Q on the input, int8 weights, int32 bias, Q/DQ on the output: what a layer
costs when its neighbours are float), over a range of sizes, and prints the
int8/float time ratio per size. The `cpu` target descriptor's `int8_min_macs`
comes from this table.

    python tools/cpu_layer_costs.py [--threads 2] [--runs 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper




def conv_model(cin: int, cout: int, hw: int, k: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.1).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[k // 2] * 4)
    g = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def timed(path: Path, shape, threads: int, runs: int) -> float:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for _ in range(10):
        sess.run(None, {"x": x})
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        samples.append(time.perf_counter() - t)
    return float(np.median(samples))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    import qcompile

    sizes = [(8, 8, 8, 1), (16, 16, 8, 1), (32, 32, 16, 1), (32, 64, 16, 3), (64, 64, 32, 3),
             (64, 128, 40, 3), (128, 128, 80, 3)]
    print(f"{'cin':>4} {'cout':>4} {'hw':>4} {'k':>2} {'MACs':>12} {'float us':>9} {'int8 us':>9} {'int8/float':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for cin, cout, hw, k in sizes:
            src = Path(tmp) / "conv.onnx"
            onnx.save(conv_model(cin, cout, hw, k), src)
            calib = Path(tmp) / "calib.npz"
            np.savez(calib, x=np.random.default_rng(2).standard_normal((4, cin, hw, hw)).astype(np.float32))
            out = Path(tmp) / "out"
            qcompile.compile_model(src, target="cpu", recipe="w8a8", calib=calib, output_dir=out,
                                   verify=False, progress=False)
            macs = cin * cout * hw * hw * k * k
            tf = timed(src, (1, cin, hw, hw), args.threads, args.runs)
            tq = timed(out / "model.onnx", (1, cin, hw, hw), args.threads, args.runs)
            print(f"{cin:>4} {cout:>4} {hw:>4} {k:>2} {macs:>12} {tf * 1e6:>9.1f} {tq * 1e6:>9.1f} {tq / tf:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
