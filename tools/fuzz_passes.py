"""Property test of the float-preserving passes on random graphs (models/random_graphs.py).

Each random graph goes through `canonicalize`, `fuse`, `smooth_quant` (explicit Mul allowed,
before any quantization), `cle` and `equalize_outputs`, each case after canonicalize as a
compile runs it, and onnxruntime's output of the rewritten graph must equal the original's
(relative L2 error under 1e-4: these passes change rounding, not values). A failure is
minimised to the fewest blocks that still fail and printed as a reproducer.

    python tools/fuzz_passes.py --count 1000 [--start 0] [--case cle]

tests/test_fuzz_passes.py runs a fast slice of the same seeds on every commit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.random_graphs import Spec, build, minimise, random_spec  # noqa: E402

TOLERANCE = 1e-4
CASES = {
    "canonicalize": ["canonicalize"],
    "fuse": ["canonicalize", "fuse"],
    "smooth_quant": ["canonicalize", "fuse", "smooth_quant"],
    "cle": ["canonicalize", "cle"],
    "equalize_outputs": ["canonicalize", "equalize_outputs"],
}
_OPTIONS = {"smooth_quant": "\n      alpha: 0.5\n      explicit_mul: true"}


def _recipe(passes: list[str]) -> str:
    steps = "".join(f"\n    - type: {p}{_OPTIONS.get(p, '')}" for p in passes)
    return f"apiversion: qcompile/v1\nmetadata: {{name: fuzz}}\nspec:\n  passes:{steps}\n"


def run_case(spec: Spec, case: str) -> str | None:
    """None when the case keeps the graph's outputs, else what went wrong (one line)."""
    import onnx
    import onnxruntime as ort
    import onnx_ir as ir

    from qcompile.calib_data import model_input_specs, open_dataset
    from qcompile.model_io import fix_input_shapes, load_model, set_ir_version
    from qcompile.pass_context import PassContext
    from qcompile.pipeline import run_pipeline
    from qcompile.recipe import load_recipe
    from qcompile.targets import load_target

    model, data = build(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path, npz, rpath = Path(tmp) / "m.onnx", Path(tmp) / "d.npz", Path(tmp) / "r.yaml"
        onnx.save(model, str(path))
        np.savez(npz, x=data)
        rpath.write_text(_recipe(CASES[case]))
        try:
            ref_sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - the generator made a graph onnxruntime refuses: its bug
            return f"generator: onnxruntime refuses the original ({str(err).splitlines()[0][:160]})"
        try:
            ir_model = load_model(path)
            dataset = open_dataset(npz, model_input_specs(ir_model))
            fix_input_shapes(ir_model, {"x": [1, *data.shape[1:]]})
            ctx = PassContext(target=load_target("cpu:avx512_vnni"), data=dataset, progress=False)
            ir_model = run_pipeline(ir_model, load_recipe(str(rpath)), ctx)
            set_ir_version(ir_model)
            got_sess = ort.InferenceSession(ir.to_proto(ir_model).SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - any exception is a finding
            return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        worst = 0.0
        for i in range(len(data)):
            (ref,) = ref_sess.run(None, {"x": data[i:i + 1]})
            (got,) = got_sess.run(None, {"x": data[i:i + 1]})
            if got.shape != ref.shape:
                return f"output shape {got.shape} != {ref.shape}"
            worst = max(worst, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)))
        return None if worst < TOLERANCE else f"outputs differ: relative L2 error {worst:.2e}"


def check(seed: int, cases=tuple(CASES)) -> list[tuple[str, str, Spec]]:
    """[(case, what failed, minimised spec)] for one seed."""
    spec, found = random_spec(seed), []
    for case in cases:
        problem = run_case(spec, case)
        if problem is not None:
            small = minimise(spec, lambda s, c=case: run_case(s, c) is not None)
            found.append((case, run_case(small, case) or problem, small))
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable)")
    args = ap.parse_args(argv)
    import logging
    logging.disable(logging.WARNING)   # the passes' own warnings (unfused attention, ...) are not findings
    cases = tuple(args.case or CASES)
    started, failures = time.time(), []
    for seed in range(args.start, args.start + args.count):
        for case, problem, spec in check(seed, cases):
            failures.append((case, problem, spec))
            print(f"FAIL {case}: {problem}\n  reproduce: build(Spec(**{spec.__dict__}))", flush=True)
        if (seed - args.start + 1) % 100 == 0:
            print(f"{seed - args.start + 1} graphs, {len(failures)} failures, {time.time() - started:.0f} s", flush=True)
    print(f"{args.count} graphs x {len(cases)} cases: {len(failures)} failures in {time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
