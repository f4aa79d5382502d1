"""A small onnx.helper graph builder shared by the seeded reference models: nodes named
like the exporters name them (`/scope/Op`, `/scope/Op_1`), outputs `<node>_output_0`, and
shared constants named by their value."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def write_with_data(out_dir, filename: str, model: onnx.ModelProto, sample_inputs, seed: int) -> dict:
    """`filename` in `out_dir` with calib.npz (32 samples, seed + 1) and eval.npz (64, seed + 2)
    from `sample_inputs(n, seed)`: what every seeded builder's `write` ships."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / filename, "calib": out / "calib.npz", "eval": out / "eval.npz"}
    onnx.save(model, paths["model"])
    np.savez(paths["calib"], **sample_inputs(32, seed + 1))
    np.savez(paths["eval"], **sample_inputs(64, seed + 2))
    return paths


def plant_outliers(rng: np.random.Generator, hidden: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` hidden channels and a 10-20x gain for each: where a builder plants activation
    outliers (what SmoothQuant-style passes must handle)."""
    outliers = rng.choice(hidden, size=min(count, hidden), replace=False)
    return outliers, rng.uniform(10.0, 20.0, size=outliers.size)


class GraphBuilder:
    """Nodes named like the exporter's (`/scope/Op`, `/scope/Op_1`, ...), outputs `<node>_output_0`."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._init_names: set[str] = set()
        self._node_names: dict[str, int] = {}

    def init(self, name: str, array, dtype=np.float32) -> str:
        if name not in self._init_names:
            self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
            self._init_names.add(name)
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A shared constant initializer, named by its value."""
        arr = np.asarray(value, dtype=dtype)
        text = "_".join(str(v) for v in arr.ravel().tolist()) if arr.size else "empty"
        suffix = "" if arr.ndim == 0 else f"_r{arr.ndim}"
        return self.init(f"const_{np.dtype(dtype).name}_{text}{suffix}".replace("-", "m").replace(".", "p"),
                         arr, dtype)

    def node(self, op: str, inputs: list[str], scope: str, *, output: str | None = None, **attrs) -> str:
        base = f"{scope}/{op}"
        k = self._node_names.get(base, 0)
        self._node_names[base] = k + 1
        name = base if k == 0 else f"{base}_{k}"
        out = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out
