"""The ISA paths of the generated CPU kernels this machine can run, and a session that forces one.

Shared by the generated-kernel tests: each kernel is checked on every path the host has
(QCOMPILE_KERNEL_PATH forces one when the session creates the kernel).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def runnable_paths() -> list[str]:
    flags = _cpu_flags()
    paths = ["scalar"]
    if {"avx2", "fma"} <= flags:
        paths.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        paths.append("avx512_vnni")
    return paths


def session(model: bytes, library: Path, path: str, monkeypatch, threads: int = 2) -> ort.InferenceSession:
    monkeypatch.setenv("QCOMPILE_KERNEL_PATH", path)      # read when the session creates the kernel
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
