"""Where the weights a compile rewrites live. Normally in memory; under `--max-memory`
(compiler/memory_plan.py) a `WeightSpill` is active for the compile, and

* `stored_tensor` appends each new weight of 1 MiB or more (int8 weights, GPTQ's rounded ones)
  to a scratch file and hands back an external tensor over it (read into a fresh array at
  each use: `UnmappedExternalTensor`, which every external weight of a compile is);
* `derived_tensor` — a weight that is a cheap function of another (SmoothQuant's or AWQ's
  per-channel scaling) — is not stored at all: a lazy tensor recomputes it from its source
  at each use, so neither memory nor disk holds a float32 copy of a 7B model.

Without a spill both return ordinary in-memory tensors, computed at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from .errors import OutputError

SPILL_THRESHOLD = 1 << 20   # bytes: smaller weights (scales, biases, norms) stay in memory
_ALIGN = 64

_SPILL: contextvars.ContextVar["WeightSpill | None"] = contextvars.ContextVar("qcompile_weight_spill", default=None)


class UnmappedExternalTensor(ir.ExternalTensor):
    """An external tensor that is read into a fresh array at each use and never stays mapped.
    onnx_ir's ExternalTensor keeps its file mapped once read, and every page a pass touched
    then counts in the process's memory: a 7B compile reading each weight once held 8 GB of
    mapped weights after its quantize pass. Serialized, it is still an external reference."""

    __slots__ = ()

    def numpy(self) -> np.ndarray:
        array = np.array(super().numpy())
        self.release()
        return array

    def __array__(self, dtype=None, copy=None):
        return self.numpy().astype(dtype, copy=False) if dtype is not None else self.numpy()

    def tobytes(self) -> bytes:
        data = super().tobytes()
        self.release()
        return data


def unmapped(tensor: ir.ExternalTensor) -> UnmappedExternalTensor:
    return UnmappedExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                                  name=tensor.name, base_dir=tensor.base_dir)


class WeightSpill:
    """An append-only scratch file of rewritten weights."""

    def __init__(self, folder: Path, threshold: int = SPILL_THRESHOLD):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "weights.data"
        self.threshold = threshold
        self._file = open(self.path, "wb")
        self.bytes = 0
        self.tensors = 0

    def store(self, array: np.ndarray, name: str) -> ir.TensorProtocol:
        if array.nbytes < self.threshold:
            return ir.tensor(array, name=name)
        array = np.ascontiguousarray(array)
        offset = -(-self.bytes // _ALIGN) * _ALIGN
        try:
            self._file.write(b"\0" * (offset - self.bytes))
            self._file.write(array.tobytes())
            self._file.flush()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(f"the disk filled while spilling rewritten weights to {self.path} "
                                  f"({(offset + array.nbytes) / 1e9:.2f} GB needed there so far)",
                                  hint="free space on that disk, or raise --max-memory") from None
            raise OutputError(f"cannot spill weights to {self.path}: {err}") from None
        self.bytes = offset + array.nbytes
        self.tensors += 1
        return UnmappedExternalTensor(self.path.name, offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                      shape=ir.Shape(array.shape), name=name, base_dir=self.path.parent)

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def weight_spill(folder: Path | None):
    """Rewritten weights of everything run inside go to `folder` (None: they stay in memory)."""
    if folder is None:
        yield None
        return
    spill = WeightSpill(folder)
    token = _SPILL.set(spill)
    try:
        yield spill
    finally:
        _SPILL.reset(token)
        spill.close()


def stored_tensor(array: np.ndarray, name: str) -> ir.TensorProtocol:
    """A new weight: in memory, or appended to the active spill file."""
    spill = _SPILL.get()
    return spill.store(array, name) if spill is not None else ir.tensor(array, name=name)


def derived_tensor(source: ir.TensorProtocol, transform: Callable[[np.ndarray], np.ndarray], name: str,
                   dtype: ir.DataType = ir.DataType.FLOAT) -> ir.TensorProtocol:
    """`transform(source)` (of `dtype`, `source`'s shape): computed now, or — under a spill — lazily
    at each use, from `source` (re-read each time)."""
    spill = _SPILL.get()

    def compute():
        return ir.tensor(np.ascontiguousarray(transform(source.numpy())), name=name)

    if spill is None or source.size * dtype.itemsize < spill.threshold:
        return compute()
    return ir.LazyTensor(compute, dtype=dtype, shape=source.shape, name=name)
