"""qcompile as the benches run it: the CLI in a fresh measured subprocess, exactly as a user
invokes it, with its report condensed for the tables."""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from .measure import model_size_mb, run_measured


_REPORT_KEYS = ("target_variant", "quantize", "cpu_kernels", "cpu_forms", "compile_seconds", "warnings",
                "verification", "model_export", "kv_cache", "budget", "mixed_precision", "sparsify")


def qcompile_command(python: str, model, calib, shapes: dict | None, out_dir, recipe: str,
                     verify_data=None, extra=()) -> list[str]:
    """`python -m qcompile MODEL --target cpu ...` as a user types it: shapes pinned with
    --input-shape where given (decoders keep theirs dynamic), verified on `verify_data` or not at
    all, `extra` flags (--max-loss, --max-size) last."""
    cmd = [python, "-m", "qcompile", str(model), "--target", "cpu", "--recipe", recipe, "--calib", str(calib)]
    for name, dims in (shapes or {}).items():
        cmd += ["--input-shape", f"{name}:{','.join(map(str, dims))}"]
    cmd += ["--verify-data", str(verify_data)] if verify_data is not None else \
        ([] if extra and "--max-size" in extra else ["--no-verify"])
    return cmd + [*map(str, extra), "-o", str(out_dir), "-q"]


def run_qcompile(python: str, model, calib, shapes: dict | None, out_dir, recipe: str, *, verify_data=None,
                 timeout: float | None = 3600, mem_limit_mb: float | None = None, extra=()) -> dict:
    """The qcompile CLI in a fresh subprocess, measured exactly like the peers."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)             # never pick up a stale model.onnx
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = qcompile_command(python, model, calib, shapes, out_dir, recipe, verify_data, extra)
    log = out_dir.with_name(out_dir.name + ".log")
    # cwd = the work folder, not the repository: an internal error writes qcompile-crash.log
    # into the cwd, and it belongs next to this compile's log (and in the row), not in the checkout.
    crash = out_dir.parent / "qcompile-crash.log"
    crash.unlink(missing_ok=True)
    r = run_measured(cmd, timeout=timeout, cwd=str(out_dir.parent), mem_limit_mb=mem_limit_mb, log_path=log)
    out = out_dir / "model.onnx"
    ok = r["rc"] == 0 and not r["error"] and out.is_file()
    row = dict(status="ok" if ok else "error", rc=r["rc"], wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
               size_mb=model_size_mb(out) if ok else None, out=str(out) if ok else None,
               error=r["error"] or (None if ok else f"qcompile exited 0 but {out} is missing"),
               command=shlex.join(map(str, cmd)), log=str(log))
    if crash.is_file():
        kept = out_dir.with_name(out_dir.name + ".crash.log")
        os.replace(crash, kept)
        row["crash_log"] = str(kept)
        last = [l for l in kept.read_text(errors="replace").splitlines() if l.strip()][-1:]
        if last and row["error"]:
            row["error"] += f" | crash log: {last[0].strip()[:400]}"
    rep = out_dir / "report.json"
    if ok and rep.is_file():
        try:
            rj = json.loads(rep.read_text())
            row["report"] = {k: rj.get(k) for k in _REPORT_KEYS}
            row["layer_summary"] = layer_summary(rj)
        except (OSError, ValueError):
            pass
    return row


def layer_summary(report: dict) -> dict:
    """report.json ``layers`` condensed: how many layers got each (scheme, kernel), and the
    distinct speed notes -- what the table's one line per recipe cannot say."""
    layers = report.get("layers") or {}
    items = layers.items() if isinstance(layers, dict) else ((l.get("name", "?"), l) for l in layers)
    counts: dict[str, int] = {}
    notes: list[str] = []
    for name, l in items:
        if not isinstance(l, dict):
            continue
        op = l.get("op")
        if l.get("status") != "quantized" or not l.get("scheme"):
            k = f"{op + ': ' if op else ''}kept {l.get('status') or 'float'}"
        else:
            k = f"{op}: {l['scheme']} -> {l.get('lowered_to') or l.get('kernel') or '?'}"
        counts[k] = counts.get(k, 0) + 1
        if l.get("speed_note") and l["speed_note"] not in notes:
            notes.append(l["speed_note"])
    return dict(counts=dict(sorted(counts.items(), key=lambda kv: -kv[1])), speed_notes=notes[:6])
