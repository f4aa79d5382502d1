"""CUTLASS's headers, which the CUDA GEMM kernels are built on.

NVIDIA's `nvidia-cutlass` wheel carries the C++ headers (`cutlass_library/source/include/`:
`cutlass/` and `cute/`). Installing it would pull its Python interface's dependencies
(cuda-python, scipy, ...), so we pin one wheel by version and SHA-256, fetch it with
`pip download --no-deps` (the file pip would install, checked against the hash), unpack
only the include folder and cache it. `CUTLASS_INCLUDE_DIR` points at headers a user already
has (a CUTLASS checkout's `include/`) instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..cache_dir import cache_root
from ..errors import TargetError
from .header_cache import install_folder

VERSION = "4.2.0.0"
WHEEL = f"nvidia_cutlass-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6"
MEMBER = "cutlass_library/source/include/"
REQUIRED = ("cutlass/cutlass.h", "cutlass/gemm/device/gemm_universal_adapter.h",
            "cutlass/epilogue/threadblock/fusion/visitors.hpp", "cute/tensor.hpp")


class CutlassUnavailable(Exception):
    """No CUTLASS headers (no network, no cache): the GEMM kernels cannot be built here."""


@dataclasses.dataclass(frozen=True)
class CutlassHeaders:
    include_dir: Path
    source: str            # "CUTLASS_INCLUDE_DIR", or the pinned wheel


def find_cutlass() -> CutlassHeaders:
    """CUTLASS_INCLUDE_DIR if set (a bad one is an error), else the cached or downloaded pinned headers."""
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        folder = Path(env).expanduser()
        missing = [h for h in REQUIRED if not (folder / h).is_file()]
        if missing:
            raise TargetError(f"CUTLASS_INCLUDE_DIR {folder} holds no CUTLASS 3.5+ headers (missing "
                              f"{', '.join(missing)})",
                              hint="point it at a CUTLASS checkout's include/ folder, or unset it to use the "
                                   f"pinned nvidia-cutlass {VERSION} headers")
        return CutlassHeaders(folder, "CUTLASS_INCLUDE_DIR")
    cached = cache_root() / "cutlass" / VERSION / "include"
    if not all((cached / h).is_file() for h in REQUIRED):
        _download(cached)
    return CutlassHeaders(cached, f"nvidia-cutlass {VERSION}")


def _download(dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".cutlass-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"nvidia-cutlass=={VERSION}", "-d", str(work)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CutlassUnavailable(f"cannot run pip to fetch nvidia-cutlass {VERSION}: {err}") from None
        wheel = work / WHEEL
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise CutlassUnavailable(f"cannot fetch nvidia-cutlass {VERSION} ({tail[0]})")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise CutlassUnavailable(f"{WHEEL}: SHA-256 {digest}, expected {WHEEL_SHA256}")
        _unpack(wheel, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        install_folder(dest, ((info.filename[len(MEMBER):], archive.read(info)) for info in archive.infolist()
                              if info.filename.startswith(MEMBER) and not info.is_dir()), REQUIRED[0])
