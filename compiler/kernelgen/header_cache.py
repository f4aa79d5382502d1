"""Third-party headers unpacked into the cache, all or nothing.

onnxruntime's C API headers (from a .deb) and CUTLASS's (from a wheel) arrive as archive
members; they are written into a staging folder beside the destination and renamed into place
in one step, so a concurrent compile (or an interrupted one) never sees a half-unpacked folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable


def install_folder(dest: Path, files: Iterable[tuple[str, bytes]], marker: str) -> None:
    """Write `files` ((relative path, bytes)) as the folder `dest`; `marker` is a file that a
    complete folder holds (another process that won the race must have written it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        for relative, data in files:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            staging.rename(dest)
        except OSError:        # another process unpacked it meanwhile
            if not (dest / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
