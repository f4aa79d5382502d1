"""What the host can do and is doing: the CPU's ISA picks onnxruntime's fast int8 path; the
process's running peak RSS after each phase goes into report.json (passes, phases)."""

from __future__ import annotations

import time
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


def peak_rss_mb() -> float | None:
    """This process's peak RSS so far (VmHWM), in MB; None off Linux. Never reset: a parent
    measuring the compile (ru_maxrss) must see the true peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


class PhaseMeter:
    """Wall time of one phase of a compile, and the process's peak RSS when it ends (a
    running peak: the phase where it rises is the one that set it)."""

    def __init__(self):
        self._start = time.perf_counter()

    def done(self) -> dict:
        return {"seconds": round(time.perf_counter() - self._start, 3), "peak_rss_mb": peak_rss_mb()}
