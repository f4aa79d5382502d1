#!/usr/bin/env python3
"""Check and time qcompile's generated CUDA kernels on a GPU.

    python check.py                   # the library, manifest.json and layers.npz beside this file
    python check.py --iters 100 --out results

For every kernel in manifest.json: load the built library (ctypes), feed the kernel the layer
inputs recorded during the compile's verification (layers.npz; seeded synthetic inputs of the
spec's shapes where a kernel has none), compare its outputs with an independent numpy
reference of the kernel's arithmetic (check_references.py, beside this file) and, where
recorded, with the output onnxruntime computed for that layer, and time it against what a user
would otherwise run: cuBLASLt int8 through `torch._int_mm`, fp16 `torch.matmul`,
`torch.nn.functional.scaled_dot_product_attention`.
Writes <out>.json and <out>.md. Needs PyTorch with CUDA; the compiler itself never imports it.
Exit status: 0 all match, 1 a mismatch, 2 nothing could run (no GPU, no library, too little memory).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))       # check_references.py beside this file

from check_references import (max_rel_error, ref_attention_int8, ref_gemm_w8a8, ref_kv_attention,  # noqa: E402
                        ref_quantize_per_token, ref_w4a16, sqnr_db, unpack_int4)
LIBRARY = "libqcompile_cuda_kernels.so"
ROWS = (1, 16, 512, 4096)        # M of the GEMM cases (LLM decode to prefill)
REFERENCE_ROWS = 256             # rows (query rows) of a large case the numpy reference recomputes


class CannotRun(Exception):
    """The harness cannot run here (exit 2), said before anything is allocated."""


# ----------------------------------------------------------------------------- the GPU side

class Gpu:
    """torch on CUDA, the library, the timer; created only where a GPU is present."""

    def __init__(self, library: Path):
        try:
            import torch
        except ImportError:
            raise CannotRun("PyTorch is not installed: pip install torch (with CUDA)") from None
        if not torch.cuda.is_available():
            raise CannotRun("no CUDA device visible (torch.cuda.is_available() is false)")
        if not library.is_file():
            raise CannotRun(f"{library} is missing: build it first (cmake -S . -B build && cmake --build build)")
        self.torch = torch
        self.lib = ctypes.CDLL(str(library))
        self.device = torch.cuda.get_device_name()
        self.free_bytes = torch.cuda.mem_get_info()[0]

    def stream(self):
        return ctypes.c_void_p(self.torch.cuda.current_stream().cuda_stream)

    def fn(self, symbol: str, restype=ctypes.c_int):
        f = getattr(self.lib, symbol)
        f.restype = restype
        return f

    def tensor(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device="cuda")

    def call(self, symbol: str, *args) -> None:
        status = self.fn(symbol)(*args, self.stream())
        if status != 0:
            raise RuntimeError(f"{symbol} returned {status}")

    def time_ms(self, fn, iters: int) -> float:
        """Median of `iters` timed calls (CUDA events), after 5 warm-up calls."""
        torch = self.torch
        for _ in range(5):
            fn()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    def copy_bandwidth(self) -> float:
        """Bytes per second of a device-to-device copy of 1 GiB (read + write): the chip's practical bandwidth."""
        n = min(1 << 30, self.free_bytes // 4)
        a, b = self.empty((n,), self.torch.uint8), self.empty((n,), self.torch.uint8)
        ms = self.time_ms(lambda: b.copy_(a), 10)
        del a, b
        return 2 * n / (ms / 1e3)


def ptr(t) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _dtype(spec: dict, role: str) -> str:
    return spec["dtypes"].get(role, "float32")


def _np_float(name: str):
    return np.float16 if name == "float16" else np.float32


# ----------------------------------------------------------------------------- one check per op

def check_quantize_per_token(gpu: Gpu, kernel: dict, inputs: dict, iters: int) -> list[dict]:
    spec, symbol = kernel["spec"], f"{kernel['spec']['op']}_{kernel['id']}"
    k, rms = spec["static_dims"]["K"], spec["epilogue"] == "rms_norm"
    rng = np.random.default_rng(0)
    x = inputs.get("x", rng.standard_normal((16, k)).astype(np.float32)).reshape(-1, k)
    x = x.astype(_np_float(_dtype(spec, "activation")))
    gamma = inputs.get("gamma", rng.uniform(0.5, 1.5, k).astype(np.float32)) if rms else None
    eps = float(inputs.get("epsilon", 1e-6))
    q_ref, s_ref = ref_quantize_per_token(x.astype(np.float32), gamma, eps)
    xd = gpu.tensor(x)
    gd = gpu.tensor(gamma.astype(x.dtype)) if gamma is not None else None
    q, s = gpu.empty(x.shape, gpu.torch.int8), gpu.empty((x.shape[0],), gpu.torch.float32)
    run = lambda: gpu.call(symbol, ptr(xd), ptr(gd), ctypes.c_float(eps), ptr(q), ptr(s), x.shape[0])  # noqa: E731
    run()
    gpu.torch.cuda.synchronize()
    q_got, s_got = q.cpu().numpy(), s.cpu().numpy()
    off = int((np.abs(q_got.astype(np.int16) - q_ref) > 0).sum())
    ok = max_rel_error(s_got, s_ref) <= 1e-5 and np.abs(q_got.astype(np.int16) - q_ref).max() <= 1 \
        and off <= max(1, q_ref.size // 1000)
    ms = gpu.time_ms(run, iters)
    return [{"case": f"M={x.shape[0]}", "match": ok, "detail": f"{off} of {q_ref.size} int8 off by one",
             "ms": ms, "baseline": "", "baseline_ms": None}]


def check_gemm_w8a8(gpu: Gpu, kernel: dict, inputs: dict, iters: int, rows=ROWS) -> list[dict]:
    torch = gpu.torch
    spec, symbol = kernel["spec"], f"{kernel['spec']['op']}_{kernel['id']}"
    k, n, epilogue = spec["static_dims"]["K"], spec["static_dims"]["N"], spec["epilogue"]
    out_dtype = torch.float16 if _dtype(spec, "output") == "float16" else torch.float32
    rng = np.random.default_rng(1)
    weight = inputs.get("weight_nk", rng.integers(-127, 128, (n, k), dtype=np.int8))
    wscale = inputs.get("weight_scale", rng.uniform(1e-3, 2e-2, n).astype(np.float32)).reshape(-1)
    bias = inputs.get("bias", rng.standard_normal(n).astype(np.float32) * 0.1)
    wd, wsd, bd = gpu.tensor(weight), gpu.tensor(np.broadcast_to(wscale, (n,)).copy()), gpu.tensor(bias)
    results = []
    recorded = "x" in inputs
    cases = [inputs["x"].reshape(-1, k).astype(np.float32)] if recorded else \
        [rng.standard_normal((m, k)).astype(np.float32) for m in rows]
    for x in cases:
        m = x.shape[0]
        if 2 * m * k + m * n * 4 + n * k > gpu.free_bytes:
            results.append({"case": f"M={m}", "match": None, "detail": "skipped: larger than the free GPU memory",
                            "ms": None, "baseline": "", "baseline_ms": None})
            continue
        q_ref, s_ref = ref_quantize_per_token(x, None, 0.0)
        rows_checked = min(m, REFERENCE_ROWS)     # rows are independent: the first ones judge the tiling
        want = ref_gemm_w8a8(q_ref[:rows_checked], weight, s_ref[:rows_checked], np.broadcast_to(wscale, (n,)), bias,
                             epilogue)
        qd, sd = gpu.tensor(q_ref), gpu.tensor(s_ref)
        out = gpu.empty((m, n), out_dtype)
        run = lambda: gpu.call(symbol, ptr(qd), ptr(wd), ptr(sd), ptr(wsd), ptr(bd), ptr(out), m)  # noqa: E731
        run()
        torch.cuda.synchronize()
        got = out.float().cpu().numpy()
        err = max_rel_error(got[:rows_checked], want)
        tol = 2e-3 if out_dtype == torch.float16 else 1e-5
        row = {"case": f"M={m}" + (" (recorded)" if recorded else ""), "match": err <= tol,
               "detail": f"max rel error {err:.2e} (tolerance {tol:g}, first {rows_checked} rows)",
               "ms": gpu.time_ms(run, iters)}
        if "layer_output" in inputs:
            row["detail"] += f"; {sqnr_db(got, inputs['layer_output'].reshape(m, n)):.1f} dB against onnxruntime's layer"
        # what a user would otherwise run: cuBLASLt int8 (int32 out, no epilogue), fp16 GEMM
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            wt = wd.t()
            row["baseline"], row["baseline_ms"] = "torch._int_mm (cuBLASLt int8)", gpu.time_ms(
                lambda: torch._int_mm(qd, wt), iters)
        else:
            xh, wh = gpu.tensor(x.astype(np.float16)), wd.t().half()
            row["baseline"], row["baseline_ms"] = "fp16 torch.matmul", gpu.time_ms(lambda: xh @ wh, iters)
        results.append(row)
    return results


def check_w4a16(gpu: Gpu, kernel: dict, inputs: dict, iters: int, rows=(1, 2, 4, 8, 16),
                bandwidth: float | None = None) -> list[dict]:
    torch = gpu.torch
    spec, symbol = kernel["spec"], f"{kernel['spec']['op']}_{kernel['id']}"
    dims = spec["static_dims"]
    k, n, group = dims["K"], dims["N"], dims["G"]
    signed = _dtype(spec, "weight") == "int4"
    zero_points = "zero_point" in spec["scale_layout"]
    act = _np_float(_dtype(spec, "activation"))
    rng = np.random.default_rng(2)
    packed = inputs.get("weight_packed", rng.integers(0, 256, k * n // 2, dtype=np.uint8))
    scale = inputs.get("scale", rng.uniform(1e-3, 2e-2, (k // group, n)).astype(np.float32))
    zp_packed = inputs.get("zero_point_packed", rng.integers(0, 256, (k // group) * n // 2, dtype=np.uint8)) \
        if zero_points else None
    bias = inputs.get("bias", rng.standard_normal(n).astype(np.float32) * 0.1) if "bias" in spec["epilogue"] else None
    w = unpack_int4(packed, (k, n), signed)
    zp = unpack_int4(zp_packed, (k // group, n), signed) if zero_points else None
    wd, sd = gpu.tensor(packed), gpu.tensor(scale)
    zd, bd = (gpu.tensor(zp_packed) if zero_points else None), (gpu.tensor(bias) if bias is not None else None)
    recorded = "x" in inputs
    cases = [inputs["x"].reshape(-1, k)] if recorded else [rng.standard_normal((m, k)) for m in rows]
    if bandwidth is None:
        bandwidth = gpu.copy_bandwidth()
    wh = gpu.empty((k, n), torch.float16).normal_()     # the fp16 baseline's weight, once for every M
    results = []
    for x in cases:
        x = x.astype(act)
        m = x.shape[0]
        want = ref_w4a16(x.astype(np.float32), w, scale, zp, bias, group)
        xd, out = gpu.tensor(x), gpu.empty((m, n), torch.float32)
        run = lambda: gpu.call(symbol, ptr(xd), ptr(wd), ptr(sd), ptr(zd), ptr(bd), ptr(out), m)  # noqa: E731
        run()
        torch.cuda.synchronize()
        got = out.cpu().numpy()
        err = max_rel_error(got, want)
        ms = gpu.time_ms(run, iters)
        moved = packed.nbytes + scale.nbytes + (zp_packed.nbytes if zero_points else 0) + x.nbytes + m * n * 4
        achieved = moved / (ms / 1e3)
        xh = gpu.tensor(x.astype(np.float16))
        results.append({"case": f"M={m}" + (" (recorded)" if recorded else ""), "match": err <= 1e-4,
                        "detail": f"max rel error {err:.2e}; {achieved / 1e12:.2f} TB/s = "
                                  f"{100 * achieved / bandwidth:.0f} % of a device copy's {bandwidth / 1e12:.2f} TB/s",
                        "ms": ms, "baseline": "fp16 torch.matmul", "baseline_ms": gpu.time_ms(lambda: xh @ wh, iters),
                        "bandwidth_fraction": achieved / bandwidth})
    return results


def check_attention_int8(gpu: Gpu, kernel: dict, inputs: dict, iters: int,
                         shapes=((1, 512), (1, 2048), (4, 4096))) -> list[dict]:
    torch = gpu.torch
    spec, symbol = kernel["spec"], f"{kernel['spec']['op']}_{kernel['id']}"
    d, heads = spec["static_dims"]["head_dim"], spec["static_dims"]["heads"]
    act = _np_float(_dtype(spec, "activation"))
    rng = np.random.default_rng(3)
    scale = float(inputs.get("scale", 1.0 / math.sqrt(d)))
    qs = inputs.get("q_scale", np.full(heads, 4.0 / 127, np.float32)).reshape(-1)
    ks = inputs.get("k_scale", np.full(heads, 4.0 / 127, np.float32)).reshape(-1)
    vs = inputs.get("v_scale", np.full(heads, 4.0 / 127, np.float32)).reshape(-1)
    recorded = "query" in inputs
    cases = [(inputs["query"], inputs["key"], inputs["value"], inputs.get("attention_bias"))] if recorded else [
        tuple(rng.standard_normal((b, s, heads * d)).astype(np.float32) for _ in range(3)) + (None,)
        for b, s in shapes]
    results = []
    sym_ws = gpu.fn(f"{symbol}_workspace", ctypes.c_size_t)
    for q, k, v, bias in cases:
        b, s, t = q.shape[0], q.shape[1], k.shape[1]
        need = (q.nbytes + k.nbytes + v.nbytes) * 2 + sym_ws(b, s, t)
        if need > gpu.free_bytes:
            results.append({"case": f"B={b} S={s}", "match": None, "detail": "skipped: larger than the free GPU memory",
                            "ms": None, "baseline": "", "baseline_ms": None})
            continue
        q, k, v = (a.astype(act) for a in (q, k, v))
        rows = min(s, REFERENCE_ROWS)             # batch 0's first query rows: the reference stays small
        want = ref_attention_int8(q[:1, :rows].astype(np.float32), k[:1].astype(np.float32), v[:1].astype(np.float32),
                                  qs, ks, vs, None if bias is None else bias[:1, :, :rows], scale, heads, d)
        qd, kd, vd = gpu.tensor(q), gpu.tensor(k), gpu.tensor(v)
        bd = gpu.tensor(bias.astype(np.float32)) if bias is not None else None
        bb, bh = (bias.shape[0], bias.shape[1]) if bias is not None else (1, 1)
        sd = [gpu.tensor(a.astype(np.float32)) for a in (qs, ks, vs)]
        out = gpu.empty(q.shape, torch.float16 if act == np.float16 else torch.float32)
        ws = gpu.empty((sym_ws(b, s, t),), torch.uint8)
        run = lambda: gpu.call(symbol, ptr(qd), ptr(kd), ptr(vd), ptr(sd[0]), ptr(sd[1]), ptr(sd[2]),  # noqa: E731
                               len(qs), ptr(bd), bb, bh, ctypes.c_float(scale), ptr(out), ptr(ws), b, s, t)
        run()
        torch.cuda.synchronize()
        got = out.float().cpu().numpy()[:1, :rows]
        err = max_rel_error(got, want)
        heads_view = lambda a: a.half().view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
        qh, kh, vh = heads_view(qd), heads_view(kd), heads_view(vd)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # noqa: E731
        results.append({"case": f"B={b} S={s} T={t}" + (" (recorded)" if recorded else ""), "match": err <= 5e-3,
                        "detail": f"max rel error {err:.2e} (batch 0, first {rows} query rows)",
                        "ms": gpu.time_ms(run, iters), "baseline": "fp16 SDPA", "baseline_ms": gpu.time_ms(sdpa, iters)})
    return results


def check_kv_attention(gpu: Gpu, kernel: dict, inputs: dict, iters: int,
                       shapes=((1, 1, 1024), (1, 1, 8192), (16, 1, 4096))) -> list[dict]:
    torch = gpu.torch
    spec, symbol = kernel["spec"], f"{kernel['spec']['op']}_{kernel['id']}"
    dims = spec["static_dims"]
    d, qh, kvh = dims["head_dim"], dims["q_heads"], dims["kv_heads"]
    per_channel = spec["scale_layout"] == "per_channel"
    act = _np_float(_dtype(spec, "activation"))
    rng = np.random.default_rng(4)
    scale = float(inputs.get("scale", 1.0 / math.sqrt(d)))
    scale_shape = (kvh, d) if per_channel else (kvh,)
    ks = inputs.get("key_scale", rng.uniform(0.02, 0.05, scale_shape).astype(np.float32)).reshape(scale_shape)
    vs = inputs.get("value_scale", rng.uniform(0.02, 0.05, scale_shape).astype(np.float32)).reshape(scale_shape)
    recorded = "query" in inputs
    if recorded:
        cases = [(inputs["query"], inputs["key"], inputs["value"], inputs["past_key"], inputs["past_value"],
                  inputs.get("attention_bias"))]
    else:
        cases = [(rng.standard_normal((b, s, qh * d)), rng.standard_normal((b, kvh, s, d)),
                  rng.standard_normal((b, kvh, s, d)), rng.integers(-128, 128, (b, kvh, p, d), dtype=np.int8),
                  rng.integers(-128, 128, (b, kvh, p, d), dtype=np.int8), None) for b, s, p in shapes]
    sym_ws = gpu.fn(f"{symbol}_workspace", ctypes.c_size_t)
    results = []
    for query, key, value, past_k, past_v, bias in cases:
        b, s, p = query.shape[0], query.shape[1], past_k.shape[2]
        t = p + s
        query, key, value = (a.astype(act) for a in (query, key, value))
        want, want_k, want_v = ref_kv_attention(query.astype(np.float32), key.astype(np.float32),
                                                value.astype(np.float32), past_k, past_v, ks, vs, bias, scale, qh,
                                                kvh, d)
        cache_k = gpu.tensor(np.concatenate([past_k, np.zeros((b, kvh, s, d), np.int8)], 2))
        cache_v = gpu.tensor(np.concatenate([past_v, np.zeros((b, kvh, s, d), np.int8)], 2))
        qd, kd, vd = gpu.tensor(query), gpu.tensor(key), gpu.tensor(value)
        ksd, vsd = gpu.tensor(ks), gpu.tensor(vs)
        bd = gpu.tensor(bias.astype(np.float32)) if bias is not None else None
        bb, bh = (bias.shape[0], bias.shape[1]) if bias is not None else (1, 1)
        out = gpu.empty(query.shape, torch.float16 if act == np.float16 else torch.float32)
        ws = gpu.empty((sym_ws(b, s, t),), torch.uint8)
        run = lambda: gpu.call(symbol, ptr(qd), ptr(kd), ptr(vd), ptr(cache_k), ptr(cache_v), ptr(ksd),  # noqa: E731
                               ptr(vsd), ptr(bd), bb, bh, ctypes.c_float(scale), ptr(out), ptr(ws), b, s, p, t)
        run()
        torch.cuda.synchronize()
        got = out.float().cpu().numpy()
        caches_equal = bool(np.array_equal(cache_k.cpu().numpy(), want_k) and
                            np.array_equal(cache_v.cpu().numpy(), want_v))
        err = max_rel_error(got, want)
        # fp16 attention over an fp16 cache of the same length (GQA expanded), what SDPA would run
        q16 = qd.half().view(b, s, qh, d).transpose(1, 2)
        k16 = torch.randn((b, kvh, t, d), device="cuda", dtype=torch.float16).repeat_interleave(qh // kvh, 1)
        v16 = torch.randn_like(k16)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, scale=scale)  # noqa: E731
        results.append({"case": f"B={b} S={s} P={p}" + (" (recorded)" if recorded else ""),
                        "match": caches_equal and err <= 1e-4,
                        "detail": f"cache {'bit-identical' if caches_equal else 'DIFFERS'}; max rel error {err:.2e}",
                        "ms": gpu.time_ms(run, iters), "baseline": "fp16 SDPA, fp16 cache",
                        "baseline_ms": gpu.time_ms(sdpa, iters)})
    return results


CHECKS = {"QuantizePerToken": check_quantize_per_token, "QGemmW8A8": check_gemm_w8a8, "QGemmW4A16": check_w4a16,
          "QAttentionInt8": check_attention_int8, "QAttentionKVCache": check_kv_attention}


# ----------------------------------------------------------------------------- the report

def recorded_inputs(npz: Path | None, kernel_id: str) -> dict:
    """The arrays layers.npz holds for one kernel (keys `<kernel id>/<name>`): one layer's inputs."""
    if npz is None or not npz.is_file():
        return {}
    with np.load(npz) as data:
        return {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(kernel_id + "/")}


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"# Generated CUDA kernels on {device}", "",
             "| kernel | case | matches | detail | kernel ms | baseline | baseline ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['baseline_ms'] / r['ms']:.2f}×" if r.get("ms") and r.get("baseline_ms") else ""
        ms = f"{r['ms']:.4f}" if r.get("ms") is not None else ""
        base = f"{r['baseline_ms']:.4f}" if r.get("baseline_ms") is not None else ""
        match = {True: "yes", False: "**NO**", None: "—"}[r["match"]]
        lines.append(f"| {r['kernel']} | {r['case']} | {match} | {r['detail']} | {ms} | {r.get('baseline', '')} | "
                     f"{base} | {speed} |")
    return "\n".join(lines) + "\n"


def run_checks(library: Path, kernels: list[dict], inputs: Path | None, iters: int) -> tuple[list[dict], str]:
    gpu = Gpu(library)
    rows = []
    for kernel in kernels:
        check = CHECKS.get(kernel["spec"]["op"])
        if check is None:
            continue
        name = f"{kernel['spec']['op']}_{kernel['id']}"
        print(f"checking {name} ({', '.join(f'{k}={v}' for k, v in kernel['spec']['static_dims'].items())})",
              flush=True)
        try:
            found = check(gpu, kernel, recorded_inputs(inputs, kernel["id"]), iters)
        except Exception as err:    # one kernel's failure is a row, not the end of the run
            found = [{"case": "", "match": False, "detail": f"failed: {err}", "ms": None, "baseline": "",
                      "baseline_ms": None}]
        rows += [dict(r, kernel=name) for r in found]
    return rows, gpu.device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=Path, default=None, help=f"the built library (default: {LIBRARY} here "
                        "or in build/)")
    parser.add_argument("--manifest", type=Path, default=HERE / "manifest.json")
    parser.add_argument("--inputs", type=Path, default=HERE / "layers.npz", help="recorded layer inputs")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    library = args.library or next((p for p in (HERE / LIBRARY, HERE / "build" / LIBRARY) if p.is_file()),
                                   HERE / LIBRARY)
    try:
        kernels = json.loads(args.manifest.read_text())["kernels"]
        rows, device = run_checks(library, kernels, args.inputs, args.iters)
    except (CannotRun, OSError, ValueError, KeyError) as err:
        print(f"check.py: cannot run: {err}", file=sys.stderr)
        return 2
    args.out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 1 if any(r["match"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
