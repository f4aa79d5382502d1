"""ONNX's own node tests through qcompile: every case `onnx.backend.test.case.node` generates
(1,884 with onnx 1.23) that onnxruntime runs goes through load -> canonicalize -> save and must
give onnxruntime's outputs of the original; a case with a Conv/MatMul/Gemm also gets its
weight frozen into an initializer and the `quantize` pass (W8A8, calibrated on the case's
own input) and must still run with finite outputs close to the float ones. What onnxruntime
itself cannot run is skipped, counted by reason.

    python tools/onnx_node_suite.py [--only PATTERN] [--every N] [--json OUT.json]

tests/test_onnx_node_suite.py runs every 12th case on every commit.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYER_OPS = ("Conv", "MatMul", "Gemm")


def cases(every: int = 1, only: str | None = None) -> list:
    import warnings

    from onnx.backend.test.case import node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = node.collect_testcases(None)
    found = [c for c in found if only is None or re.search(only, c.name)]
    return found[::every]


def _feeds(model, data_set) -> dict:
    from onnx import TensorProto, numpy_helper
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    values = [numpy_helper.to_array(v) if isinstance(v, TensorProto) else np.asarray(v) if np.isscalar(v) else v
              for v in data_set[0]]
    return dict(zip(names, values))


def _session(model_bytes: bytes):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _same(ref, got, rtol: float, atol: float) -> bool:
    if not isinstance(ref, np.ndarray):   # sequences / optionals: compare element-wise
        return type(ref) is type(got) and len(ref) == len(got) and all(_same(a, b, rtol, atol) for a, b in zip(ref, got))
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return False
    if ref.dtype.kind in "fc":
        return bool(np.allclose(ref, got, rtol=rtol, atol=atol, equal_nan=True))
    return bool(np.array_equal(ref, got))


def _pipeline(model, passes: list[str], options: str = "", calib: dict | None = None):
    """`passes` over the model as a compile runs them (canonicalize first); a ModelProto back."""
    import onnx
    import onnx_ir as ir

    from qcompile.calib_data import model_input_specs, open_dataset
    from qcompile.model_io import load_model, set_ir_version
    from qcompile.pass_context import PassContext
    from qcompile.pipeline import run_pipeline
    from qcompile.recipe import load_recipe
    from qcompile.targets import load_target
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text("apiversion: qcompile/v1\nmetadata: {name: node-suite}\nspec:\n  passes:\n"
                          + "".join(f"    - type: {p}\n" for p in passes) + options)
        ir_model = load_model(path)
        dataset = None
        if calib is not None:
            np.savez(Path(tmp) / "d.npz", **calib)   # the data's axis 0 is the model's first dimension
            dataset = open_dataset(Path(tmp) / "d.npz", model_input_specs(ir_model))
        ctx = PassContext(target=load_target("cpu:avx512_vnni"), data=dataset, progress=False)
        ir_model = run_pipeline(ir_model, load_recipe(str(recipe)), ctx)
        set_ir_version(ir_model)
        return ir.to_proto(ir_model), ctx


def _frozen_layer_model(model, feeds: dict):
    """The model with each float Conv/MatMul/Gemm weight input that is a graph input turned into
    an initializer holding the test's value (node tests feed weights as inputs), or None."""
    import onnx
    from onnx import numpy_helper
    graph_inputs = {i.name for i in model.graph.input}
    weights = {n.input[1] for n in model.graph.node if n.op_type in LAYER_OPS and len(n.input) > 1
               and n.input[1] in graph_inputs and n.input[1] in feeds and feeds[n.input[1]].dtype == np.float32}
    if not weights:
        return None
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    keep = [i for i in frozen.graph.input if i.name not in weights]
    del frozen.graph.input[:]
    frozen.graph.input.extend(keep)
    frozen.graph.initializer.extend(numpy_helper.from_array(feeds[w], w) for w in sorted(weights))
    return frozen


def run_case(case) -> tuple[str, str]:
    """(status, detail): status ok | skip | fail."""
    model, data_set = case.model, case.data_sets[0]
    feeds = _feeds(model, data_set)
    try:
        ref = _session(model.SerializeToString()).run(None, feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime cannot run the original: not ours to test
        return "skip", "onnxruntime: " + _reason(err)
    rtol, atol = max(case.rtol, 1e-5), max(case.atol, 1e-6)
    try:
        proto, _ = _pipeline(model, ["canonicalize"])
        got = _session(proto.SerializeToString()).run(None, feeds)
    except Exception as err:  # noqa: BLE001 - a finding
        return "fail", f"canonicalize: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
    if len(got) != len(ref) or not all(_same(r, g, rtol, atol) for r, g in zip(ref, got)):
        return "fail", "canonicalize changed the outputs"
    frozen = _frozen_layer_model(model, feeds)
    if frozen is None:
        return "ok", "canonicalize"
    rest = {k: v for k, v in feeds.items() if k in {i.name for i in frozen.graph.input}}
    try:
        proto, ctx = _pipeline(frozen, ["canonicalize", "calibrate", "quantize"],
                               "      speed_fallback: false\n", calib=rest)
        got = _session(proto.SerializeToString()).run(None, rest)
    except Exception as err:  # noqa: BLE001 - a finding, unless the quantize pass refused with a user error
        from qcompile.errors import QCompileError
        if isinstance(err, QCompileError):
            return "ok", f"canonicalize; quantize refused: {str(err).splitlines()[0][:120]}"
        return "fail", f"quantize: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
    quantized = len(ctx.layers.quantized())
    bad = [i for i, (r, g) in enumerate(zip(ref, got)) if isinstance(g, np.ndarray) and g.dtype.kind == "f"
           and (not np.all(np.isfinite(g[np.isfinite(r)])) or _rel(r, g) > 0.25)]
    if bad:
        return "fail", f"quantize ({quantized} layers): output {bad[0]} off by {_rel(ref[bad[0]], got[bad[0]]):.2f} (relative L2)"
    return "ok", f"canonicalize; quantize ({quantized} layers)"


def _rel(r: np.ndarray, g: np.ndarray) -> float:
    mask = np.isfinite(r) & np.isfinite(g)
    return float(np.linalg.norm((r - g)[mask]) / max(np.linalg.norm(r[mask]), 1e-12))


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split())
    for pattern, label in ((r"NOT_IMPLEMENTED|Could not find an implementation", "no kernel for this op/type"),
                           (r"is not a registered function/op|No Op registered|No opset import", "op or opset unknown"),
                           (r"Type Error|type.*not supported|Unsupported", "type not supported"),
                           (r"ShapeInferenceError|shape inference", "shape inference"),
                           (r"IR version", "IR version"),
                           (r"model_load_utils|opset.*(not supported|is under development)", "opset newer than onnxruntime's")):
        if re.search(pattern, text, re.I):
            return label
    return "other: " + text[:100]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="regex over case names")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    started, results = time.time(), {}
    for case in cases(args.every, args.only):
        results[case.name] = run_case(case)
        if results[case.name][0] == "fail":
            print(f"FAIL {case.name}: {results[case.name][1]}", flush=True)
    counts = collections.Counter(s for s, _ in results.values())
    skips = collections.Counter(d for s, d in results.values() if s == "skip")
    quantized = sum(1 for s, d in results.values() if s == "ok" and "quantize (" in d)
    print(f"{len(results)} cases in {time.time() - started:.0f} s: {counts['ok']} ok ({quantized} also quantized), "
          f"{counts['fail']} failed, {counts['skip']} skipped")
    for reason, n in skips.most_common():
        print(f"  skipped {n}: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
