"""What the host CPU can do: the ISA picks onnxruntime's fast int8 path."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_isa(known: list[str]) -> str:
    """The first of `known` (ordered best first) whose flag the host has; else the last."""
    flags = cpu_flags()
    for isa in known:
        if isa in flags:
            return isa
    return known[-1] if known else ""
