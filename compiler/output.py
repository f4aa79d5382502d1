"""Output directory staging: everything is written under a temporary name next to
the destination and moved into place only when the whole compile succeeded."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError


def keep_only(folder: Path, inner: Path) -> None:
    """Make `folder` hold exactly the contents of `inner`, a folder inside it (one trial compile
    staged inside another, e.g. by the accuracy budget); everything else in `folder` is dropped."""
    keep = folder / ".keep"
    inner.rename(keep)
    for item in list(folder.iterdir()):
        if item != keep:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    for item in list(keep.iterdir()):
        item.rename(folder / item.name)
    keep.rmdir()


class StagedOutput:
    def __init__(self, destination: str | os.PathLike):
        self.destination = Path(destination)
        parent = self.destination.resolve().parent
        if self.destination.exists() and not self.destination.is_dir():
            raise OutputError(f"output {self.destination} exists and is not a directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.tmp-", dir=parent))
        except OSError as err:
            raise OutputError(f"cannot write the output directory {self.destination}: {err.strerror}",
                              hint="choose a writable -o directory") from None

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> list[Path]:
        """Move the staged files into the destination (replacing same-named files)."""
        try:
            self.destination.mkdir(parents=True, exist_ok=True)
            moved = []
            for item in sorted(self.staging.iterdir()):
                target = self.destination / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
                moved.append(target)
        except OSError as err:
            raise OutputError(f"cannot write the output directory {self.destination}: {err.strerror}") from None
        finally:
            self.discard()
        return moved

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
