"""What the generated-kernel tests share: the ISA paths this machine can run and a session that
forces one (QCOMPILE_KERNEL_PATH is read when the session creates the kernel), a session over
a compiled model with its kernel library, and the float64 attention the attention kernels'
numpy references end in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


# A compile that checks one generated op against its standard-op form: the companion norm kernel
# (generate_kernels.norms, tested on its own in test_skip_layer_norm.py) stays out, so nothing
# else differs between the two compiles.
ONLY_THIS_OP = ("generate_kernels.norms=never",)


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


def run_compiled(model: Path, feeds: dict, library: Path | None = None) -> np.ndarray:
    """The first output of a compiled model, its generated-kernel library registered if given."""
    return library_session(model, library).run(None, feeds)[0]


def library_session(model: Path, library: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def attention_float64(query, keys, values, bias, softmax_scale: float) -> np.ndarray:
    """softmax(scale · q·kᵀ + bias)·v in float64; q [B, H, S, D], k and v [B, H, T, D] (already
    dequantized, KV heads already repeated) -> [B, S, H·D]."""
    batch, heads, seq, d = query.shape
    scores = softmax_scale * (query @ keys.transpose(0, 1, 3, 2))
    if bias is not None:
        scores = scores + bias
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return (p @ values).transpose(0, 2, 1, 3).reshape(batch, seq, heads * d)
