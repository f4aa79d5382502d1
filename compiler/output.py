"""The output directory: one compile's files, written whole or not at all.

Everything is written into a staging directory beside the destination; on success that
directory *becomes* the destination in one rename (a previous compile's output is moved
aside first and deleted after), so the destination never holds a mix of two compiles'
files (a cpu compile after an ascend one leaves no stale `atc.sh`). A lock file beside the
destination makes a second compile into the same `-o` fail at once instead of racing the
first. The destination must be new, empty or a previous compile's output: a folder with
other files in it is refused before any work rather than deleted.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputError

# the files every compile writes: a folder holding both is a previous compile's output
OUTPUT_MARKERS = ("report.json", "recipe.resolved.yaml")


def script_writer(text: str) -> Callable[[Path], None]:
    """A target artifact writer (TargetOutputs.artifacts) for a shell script, made executable."""
    def write(path: Path) -> None:
        Path(path).write_text(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return write


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StagedOutput:
    """Lock `destination`, stage into a sibling folder, `commit()` it in one rename or `discard()` it."""

    def __init__(self, destination: str | os.PathLike):
        self.destination = Path(destination)
        self._check_destination()
        parent = self.destination.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot write the output directory {self.destination}: {err.strerror}",
                              hint="choose a writable -o directory") from None
        self._lock = self._acquire_lock(parent / f".{self.destination.name}.lock")
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.tmp-", dir=parent))
            os.chmod(self.staging, 0o777 & ~_umask())  # what mkdir would have made, not mkdtemp's 0700
        except OSError as err:
            self._release_lock()
            raise OutputError(f"cannot write the output directory {self.destination}: {err.strerror}",
                              hint="choose a writable -o directory") from None

    def _check_destination(self) -> None:
        dest = self.destination
        if dest.exists() and not dest.is_dir():
            raise OutputError(f"output {dest} exists and is not a directory")
        if not dest.is_dir():
            return
        resolved, cwd = dest.resolve(), Path.cwd().resolve()
        if cwd == resolved or resolved in cwd.parents:
            raise OutputError(f"the output directory {dest} is the current directory or holds it; a compile "
                              "replaces its output directory as a whole", hint="choose a new -o directory")
        entries = sorted(p.name for p in dest.iterdir())
        if entries and not all((dest / m).is_file() for m in OUTPUT_MARKERS):
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise OutputError(f"the output directory {dest} holds files that are not a qcompile output ({shown}); "
                              "a compile replaces its output directory as a whole",
                              hint="choose a new or empty -o directory")

    def _acquire_lock(self, path: Path):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot write the output directory {self.destination}: {err.strerror}",
                              hint="choose a writable -o directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:  # its holder unlinked it as we opened it
                raise OSError("stale lock file")
        except OSError:
            os.close(fd)
            raise OutputError(f"another qcompile is writing {self.destination} (lock {path})",
                              hint="wait for it to finish, or choose another -o directory") from None
        self._lock_path = path
        return fd

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        try:
            self._lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._lock)
            self._lock = None

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> list[Path]:
        """Make the staging folder the destination: the old output (if any) is renamed aside,
        the staging folder renamed into its place, then the old one deleted."""
        dest, old = self.destination, None
        try:
            self._check_destination()  # nothing was added to it meanwhile
            if dest.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=self.staging.parent))
                os.replace(dest, old / dest.name)
            try:
                os.replace(self.staging, dest)
            except OSError:
                if old is not None:
                    os.replace(old / dest.name, dest)
                raise
        except OSError as err:
            self.discard()
            raise OutputError(f"cannot write the output directory {dest}: {err.strerror}") from None
        except BaseException:
            self.discard()
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._release_lock()
        return sorted(dest.iterdir())

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._release_lock()
