"""Trained checkpoints exported to ONNX once (models/export_hf.py in a subprocess, so torch never
enters the bench's process) into ``$QCOMPILE_CACHE/models/<name>/export/``, and reused while the
sidecar JSON beside the export (source hash and exporter settings) still matches."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cached_export(name: str, source: Path, want: dict, python: str, *, args: tuple[str, ...] = (),
                  needs: tuple[str, ...] = (), timeout: float = 1800) -> Path:
    """``<export dir>/<name>.onnx`` from ``source``; ``want`` is what the sidecar must say for a
    cached export to be reused, ``args`` extra exporter flags (``{dir}`` is the export folder),
    ``needs`` other files the export writes beside it (a tokenizer). Raises RuntimeError with the
    exporter's last lines when it fails; a failed export leaves nothing behind."""
    from models import zoo
    out_dir = zoo.model_dir(name) / "export"
    out, side = out_dir / f"{name}.onnx", out_dir / f"{name}.onnx.json"
    if out.is_file() and side.is_file() and all((out_dir / f).is_file() for f in needs):
        try:
            if json.loads(side.read_text()) == want:
                return out
        except (OSError, ValueError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.{os.getpid()}.onnx"
    cmd = [python, str(ROOT / "models" / "export_hf.py"), str(source), str(tmp),
           *(a.format(dir=out_dir) for a in args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if p.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{name} export failed (rc={p.returncode}): {(p.stderr or p.stdout).strip()[-600:]}")
    os.replace(tmp, out)
    side.write_text(json.dumps(want, indent=1))
    return out
