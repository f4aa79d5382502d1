"""onnxruntime's C API headers, which the CPU kernel library is built against.

The onnxruntime wheel ships no headers (nor does any PyPI or npm package); Debian's
`libonnxruntime-dev` does, from Debian 13 "trixie" on. We pin one such package by
version and SHA-256, download the `.deb` itself from the Debian archive (the file apt
would fetch, checked against the hash apt would check, without touching the system's
sources or installing anything), unpack its `usr/include/onnxruntime/` and cache it.
`ORT_INCLUDE_DIR` points at headers a user already has (onnxruntime's release archives
ship them) instead.

A library built against API version N is refused by an onnxruntime older than N, so the
headers' `ORT_API_VERSION` must not exceed the runtime's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
import os
import re
import tarfile
import urllib.request
from pathlib import Path

import onnxruntime as ort

from ..cache_dir import cache_root
from ..errors import TargetError
from .header_cache import install_folder

# Debian trixie's libonnxruntime-dev (onnxruntime 1.21, ORT_API_VERSION 21)
DEB_VERSION = "1.21.0+dfsg-1"
DEB_NAME = f"libonnxruntime-dev_{DEB_VERSION}_amd64.deb"
DEB_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
DEB_URLS = (
    f"https://deb.debian.org/debian/pool/main/o/onnxruntime/{DEB_NAME}",
    # the archive drops superseded versions; snapshot.debian.org keeps every one
    f"https://snapshot.debian.org/archive/debian/20250501T000000Z/pool/main/o/onnxruntime/"
    f"{DEB_NAME.replace('+', '%2B')}",
)
REQUIRED = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
            "onnxruntime_lite_custom_op.h", "onnxruntime_float16.h")


class HeadersUnavailable(Exception):
    """No headers here (no network, no cache): the compile falls back to standard ops."""


@dataclasses.dataclass(frozen=True)
class OrtHeaders:
    include_dir: Path
    api_version: int
    source: str            # "ORT_INCLUDE_DIR", or the pinned Debian package


def runtime_api_version() -> int:
    """The newest C API version the installed onnxruntime accepts (its minor version)."""
    return int(ort.__version__.split(".")[1])


def api_version_of(include_dir: Path) -> int:
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    found = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not found:
        raise TargetError(f"{include_dir / 'onnxruntime_c_api.h'} defines no ORT_API_VERSION")
    return int(found.group(1))


def _checked(include_dir: Path, source: str) -> OrtHeaders:
    missing = [h for h in REQUIRED if not (include_dir / h).is_file()]
    if missing:
        raise TargetError(f"{source} {include_dir} holds no onnxruntime C API headers "
                          f"(missing {', '.join(missing)})",
                          hint="point ORT_INCLUDE_DIR at the include/ folder of an onnxruntime release "
                               "archive, or unset it to use the pinned Debian headers")
    api, runtime = api_version_of(include_dir), runtime_api_version()
    if api > runtime:
        raise TargetError(f"the onnxruntime headers in {include_dir} are API version {api}, newer than the "
                          f"installed onnxruntime {ort.__version__} (API version {runtime}): a kernel library "
                          "built against them would be refused at load",
                          hint=f"use headers of onnxruntime <= 1.{runtime}")
    return OrtHeaders(include_dir, api, source)


def find_headers() -> OrtHeaders:
    """ORT_INCLUDE_DIR if set (a bad one is an error), else the cached or downloaded pinned headers."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        return _checked(Path(env).expanduser(), "ORT_INCLUDE_DIR")
    cached = cache_root() / "ort-headers" / DEB_VERSION
    if not (cached / REQUIRED[0]).is_file():
        _download(cached)
    return _checked(cached, f"libonnxruntime-dev {DEB_VERSION}")


def _download(dest: Path) -> None:
    errors = []
    for url in DEB_URLS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                blob = response.read()
        except OSError as err:
            errors.append(f"{url}: {err}")
            continue
        digest = hashlib.sha256(blob).hexdigest()
        if digest != DEB_SHA256:
            errors.append(f"{url}: SHA-256 {digest}, expected {DEB_SHA256}")
            continue
        _unpack_headers(blob, dest)
        return
    raise HeadersUnavailable("cannot fetch onnxruntime's C API headers (" + "; ".join(errors) + ")")


def _unpack_headers(deb: bytes, dest: Path) -> None:
    """A .deb is an `ar` archive; its data.tar.xz holds usr/include/onnxruntime/."""
    data = _ar_member(deb, "data.tar.xz")
    prefix = "usr/include/onnxruntime/"
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
        install_folder(dest, ((m.name.lstrip("./")[len(prefix):], tar.extractfile(m).read()) for m in tar.getmembers()
                              if m.isfile() and m.name.lstrip("./").startswith(prefix)), REQUIRED[0])


def _ar_member(archive: bytes, wanted: str) -> bytes:
    if not archive.startswith(b"!<arch>\n"):
        raise HeadersUnavailable("the downloaded package is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(archive):
        header = archive[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name == wanted:
            return archive[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise HeadersUnavailable(f"the .deb holds no {wanted}")
