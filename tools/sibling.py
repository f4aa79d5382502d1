"""Import a sibling script by path: models/ and tools/ are folders of scripts, not packages.

Module names are fixed per file (qc_zoo, qc_ppocr_data, ...) so every tool that loads the same
script shares one module object.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
