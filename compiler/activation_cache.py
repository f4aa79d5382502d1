"""The activations that cross block boundaries in a layer-wise compile, per calibration batch:
in memory up to a byte budget, then in .npy files under a scratch folder (read back
memory-mapped). A disk that fills ends the compile with how much space the cache needed."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import numpy as np

from .errors import OutputError


class ActivationCache:
    def __init__(self, memory_bytes: int, folder: Path):
        self.memory_bytes = memory_bytes
        self.folder = folder
        self._memory: dict[tuple[int, str], np.ndarray] = {}
        self._files: dict[tuple[int, str], tuple[Path, int]] = {}   # (file, array bytes)
        self.in_memory = 0           # bytes held now
        self.on_disk = 0             # bytes in files now

    def put(self, batch: int, name: str, array: np.ndarray) -> None:
        key = (batch, name)
        self.drop_key(key)
        if self.in_memory + array.nbytes <= self.memory_bytes:
            self._memory[key] = array
            self.in_memory += array.nbytes
            return
        path = self.folder / f"{hashlib.sha1(name.encode()).hexdigest()[:16]}-{batch}.npy"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            np.save(path, array)
        except OSError as err:
            path.unlink(missing_ok=True)
            needed = self.on_disk + array.nbytes
            self.clear()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(f"the disk filled while caching activations in {self.folder}: the layer-wise "
                                  f"compile needed at least {needed / 1e9:.2f} GB there",
                                  hint="free that much space, or raise --max-memory so more of the cache stays "
                                       "in memory") from None
            raise OutputError(f"cannot cache activations in {self.folder}: {err}") from None
        self._files[key] = (path, array.nbytes)
        self.on_disk += array.nbytes

    def get(self, batch: int, name: str) -> np.ndarray:
        key = (batch, name)
        if key in self._memory:
            return self._memory[key]
        return np.load(self._files[key][0], mmap_mode="r")

    def keep_only(self, names: set[str]) -> None:
        """Forget every batch of the tensors not in `names` (no later block reads them)."""
        for key in [k for k in (*self._memory, *self._files) if k[1] not in names]:
            self.drop_key(key)

    def drop_key(self, key: tuple[int, str]) -> None:
        if key in self._memory:
            self.in_memory -= self._memory.pop(key).nbytes
        if key in self._files:
            path, nbytes = self._files.pop(key)
            self.on_disk -= nbytes
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        self._memory.clear()
        self._files.clear()
        self.in_memory = self.on_disk = 0
        shutil.rmtree(self.folder, ignore_errors=True)
