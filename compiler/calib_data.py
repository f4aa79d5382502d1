"""Calibration and verification data: `.npz` files (one array per model input,
batch on axis 0) or a folder of them, checked against the model's inputs and
streamed in batches; or synthetic inputs when no data is given.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from .errors import DataError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints or None for a dynamic dimension

    @classmethod
    def from_value(cls, value: ir.Value) -> "InputSpec":
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape) if value.shape is not None else ()
        return cls(value.name, np.dtype(dtype), shape)


def model_input_specs(model: ir.Model) -> list[InputSpec]:
    inits = set(model.graph.initializers)
    return [InputSpec.from_value(v) for v in model.graph.inputs if v.name not in inits]


class Dataset:
    """A validated set of samples; `batches()` streams them, file by file."""

    def __init__(self, files: list[Path], specs: list[InputSpec], *, synthetic: int = 0, seed: int = 0):
        self.files = files
        self.specs = specs
        self.synthetic = synthetic
        self.seed = seed
        self.num_samples = synthetic or sum(self._check_file(f) for f in files)
        self.feed_dtypes: dict[str, np.dtype] = {}

    def cast_to(self, dtypes: dict[str, np.dtype]) -> "Dataset":
        """The same samples, fed as `dtypes` (input name -> dtype), e.g. a float16 model's data
        to its float32-widened graph (compiler/float16.py)."""
        view = copy.copy(self)
        view.feed_dtypes = {**self.feed_dtypes, **dtypes}
        return view

    @property
    def description(self) -> str:
        if self.synthetic:
            return f"{self.synthetic} synthetic samples (seed {self.seed})"
        return f"{self.num_samples} samples from {', '.join(str(f) for f in self.files[:3])}" + \
            (" ..." if len(self.files) > 3 else "")

    def sha256(self) -> str | None:
        if self.synthetic:
            return None
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f.read_bytes())
        return digest.hexdigest()

    # -- validation -----------------------------------------------------------
    def _open(self, path: Path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"cannot read calibration data {path}: {err}",
                            hint="give an .npz made with numpy.savez (one array per model input)") from None

    def _check_file(self, path: Path) -> int:
        arrays = mmap_npz(path)
        if arrays is not None:
            return self._check_arrays(path, arrays)
        with self._open(path) as npz:
            if not hasattr(npz, "files"):
                raise DataError(f"{path} is a single array; expected an .npz with one array per model input")
            return self._check_arrays(path, {name: npz[name] for name in npz.files})

    def _check_arrays(self, path: Path, arrays: dict[str, np.ndarray]) -> int:
        names = set(arrays)
        wanted = {s.name for s in self.specs}
        if names != wanted:
            missing, extra = sorted(wanted - names), sorted(names - wanted)
            raise DataError(f"{path}: arrays {sorted(names)} do not match the model inputs {sorted(wanted)}"
                            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        counts = set()
        for spec in self.specs:
            arr = arrays[spec.name]
            self._check_array(path, spec, arr)
            counts.add(arr.shape[0] if arr.ndim else 0)
        if len(counts) != 1:
            raise DataError(f"{path}: inputs disagree on the number of samples (axis 0): {sorted(counts)}")
        return counts.pop()

    def _check_array(self, path: Path, spec: InputSpec, arr: np.ndarray) -> None:
        if arr.dtype != spec.dtype:
            raise DataError(f"{path}: input {spec.name!r} has dtype {arr.dtype}, the model wants {spec.dtype}",
                            hint=f"save it with .astype(np.{spec.dtype})")
        if arr.ndim == 0:
            raise DataError(f"{path}: input {spec.name!r} is a scalar (the model's shape {self._shape_text(spec)}, "
                            f"the data's {arr.shape}): calibration data holds samples on axis 0, which a scalar "
                            "input does not have", hint="make the input a constant (an initializer) or give it shape [1]")
        if spec.shape and arr.ndim != len(spec.shape):
            raise DataError(f"{path}: input {spec.name!r} has rank {arr.ndim} (shape {arr.shape}), "
                            f"the model wants rank {len(spec.shape)} {self._shape_text(spec)} with the batch on axis 0")
        for axis, (got, want) in enumerate(zip(arr.shape[1:], spec.shape[1:]), start=1):
            if want is not None and got != want:
                raise DataError(f"{path}: input {spec.name!r} has shape {arr.shape}, the model wants "
                                f"{self._shape_text(spec)} (axis {axis}: {got} != {want})",
                                hint="fix the data, or the model's dynamic size with --input-shape")
        if np.issubdtype(arr.dtype, np.floating):
            for start in range(0, arr.shape[0], 16):  # in slices: a mapped file stays on disk
                chunk = np.asarray(arr[start:start + 16])
                bad = ~np.isfinite(chunk)
                if bad.any():
                    sample = start + int(np.argwhere(bad)[0][0])
                    kind = "NaN" if np.isnan(chunk).any() else "Inf"
                    raise DataError(f"{path}: input {spec.name!r} holds {kind} (first in sample {sample})",
                                    hint="drop or repair those samples; calibration ranges would be meaningless")

    @staticmethod
    def _shape_text(spec: InputSpec) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"

    # -- streaming ------------------------------------------------------------
    def batches(self, batch_size: int, limit: int | None = None, *, exact: bool = False
                ) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of `batch_size` samples (the last may be smaller unless `exact`,
        for a model whose batch dimension is fixed); at most `limit` samples in all."""
        remaining = self.num_samples if limit is None else min(limit, self.num_samples)
        if exact:
            remaining -= remaining % batch_size
            if remaining == 0:
                raise DataError(f"the model's batch dimension is fixed to {batch_size}, but only "
                                f"{min(limit or self.num_samples, self.num_samples)} samples are available",
                                hint=f"give at least {batch_size} samples, or pin a smaller batch with --input-shape")
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        for chunk in self._chunks():
            n = next(iter(chunk.values())).shape[0]
            start = 0
            while start < n:
                if remaining <= 0:
                    return
                take = min(batch_size - have, n - start, remaining)
                pending.append({k: np.ascontiguousarray(v[start:start + take]) for k, v in chunk.items()})
                start += take
                have += take
                remaining -= take
                if have == batch_size or remaining == 0:
                    yield self._cast(_concat(pending))
                    pending, have = [], 0

    def _cast(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.feed_dtypes:
            return feed
        return {k: v.astype(self.feed_dtypes[k]) if k in self.feed_dtypes else v for k, v in feed.items()}

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        if self.synthetic:
            rng = np.random.default_rng(self.seed)
            for _ in range(self.synthetic):
                yield {s.name: _synthetic(s, rng) for s in self.specs}
            return
        for path in self.files:
            mapped = mmap_npz(path)
            if mapped is not None:  # uncompressed .npz: batches are read from disk as needed
                yield {s.name: mapped[s.name] for s in self.specs}
                continue
            with self._open(path) as npz:
                yield {s.name: npz[s.name] for s in self.specs}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def mmap_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Memory-map the arrays of an uncompressed .npz (numpy.savez's default layout).

    A batch slice then reads only its own bytes, so a large calibration file does
    not have to fit in memory. Returns None for compressed or unusual files.
    """
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    return None
                f.seek(info.header_offset)
                header = f.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                if dtype.hasobject:
                    return None
                arrays[info.filename[:-4]] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                                       order="F" if fortran else "C")
    except (OSError, ValueError, zipfile.BadZipFile, struct.error):
        return None
    return arrays


def _synthetic(spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    shape = (1,) + tuple(spec.shape[1:])
    if any(d is None for d in shape):
        raise DataError(f"input {spec.name!r} has dynamic dimensions {Dataset._shape_text(spec)}: "
                        "synthetic data needs fixed shapes", hint="pass --input-shape NAME:D,D,...")
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return np.ones(shape, dtype=np.bool_)
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    return rng.integers(0, 100, size=shape).astype(spec.dtype)


def open_dataset(source: str | Path | None, specs: list[InputSpec], *, synthetic_samples: int = 8,
                 seed: int = 0) -> Dataset:
    """An `.npz`, a folder of `.npz`, or None for synthetic data."""
    if source is None:
        return Dataset([], specs, synthetic=synthetic_samples, seed=seed)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            kinds = sorted({f.suffix.lower() or f.name for f in path.iterdir() if f.is_file()})
            raise DataError(f"{path} holds no .npz files" + (f" (it holds {', '.join(kinds[:5])} files)" if kinds else
                                                              " (it is empty)"),
                            hint="calibration data is .npz: one array per model input, samples on axis 0 "
                                 "(images: preprocess them as the model expects and np.savez them)")
    elif path.exists():
        files = [path]
    else:
        raise DataError(f"calibration data not found: {path}")
    return Dataset(files, specs)


def shapes_from_data(dataset: Dataset) -> dict[str, list[int]]:
    """Input shapes of one sample (batch 1), to pin a model's dynamic dimensions."""
    first = next(dataset.batches(1))
    return {k: [1, *v.shape[1:]] for k, v in first.items()}
