"""Where qcompile caches what it downloads or builds: `$QCOMPILE_CACHE` or ~/.cache/qcompile."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("QCOMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile"
