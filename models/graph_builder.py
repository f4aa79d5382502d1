"""A small onnx.helper graph builder shared by the seeded reference models: nodes named
like the exporters name them (`/scope/Op`, `/scope/Op_1`), outputs `<node>_output_0`, and
shared constants named by their value."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def write_with_data(out_dir, filename: str, model: onnx.ModelProto, sample_inputs, seed: int, *,
                    calib_samples: int = 32, eval_samples: int = 64) -> dict:
    """`filename` in `out_dir` with calib.npz (32 samples, seed + 1) and eval.npz (64, seed + 2)
    from `sample_inputs(n, seed)`: what every seeded builder's `write` ships."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / filename, "calib": out / "calib.npz", "eval": out / "eval.npz"}
    onnx.save(model, paths["model"])
    np.savez(paths["calib"], **sample_inputs(calib_samples, seed + 1))
    np.savez(paths["eval"], **sample_inputs(eval_samples, seed + 2))
    return paths


def plant_outliers(rng: np.random.Generator, hidden: int, count: int,
                   gain: tuple[float, float] = (10.0, 20.0)) -> tuple[np.ndarray, np.ndarray]:
    """`count` hidden channels and a gain in `gain` (10-20x) for each: where a builder plants
    activation outliers (what SmoothQuant-style passes must handle)."""
    outliers = rng.choice(hidden, size=min(count, hidden), replace=False)
    return outliers, rng.uniform(*gain, size=outliers.size)


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


class ExternalDataBuilder(GraphBuilder):
    """A GraphBuilder that streams every initializer of `threshold` bytes or more to one
    external data file as it is made, so a model of any size is built in the memory of its
    largest tensor. Offsets are 64-byte aligned (memory-mapped readers want that)."""

    def __init__(self, data_path, threshold: int = 1024):
        from pathlib import Path

        super().__init__()
        self.data_path = Path(data_path)
        self.threshold = threshold
        self._file = open(self.data_path, "wb")
        self.bytes_written = 0

    def init(self, name: str, array, dtype=np.float32) -> str:
        if name in self._init_names:
            return name
        arr = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        if arr.nbytes < self.threshold:
            return super().init(name, arr, dtype)
        offset = -(-self.bytes_written // 64) * 64
        self._file.write(b"\0" * (offset - self.bytes_written))
        self._file.write(arr.tobytes())
        self.bytes_written = offset + arr.nbytes
        tensor = onnx.TensorProto(name=name, dims=arr.shape,
                                  data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        for key, value in (("location", self.data_path.name), ("offset", offset), ("length", arr.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.inits.append(tensor)
        self._init_names.add(name)
        return name

    def close(self) -> None:
        self._file.close()
