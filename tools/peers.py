"""The onnxruntime-quantizer side of the benchmark ("peers"), plus shared measurement.

Why: qcompile is judged against what a user gets today from
``onnxruntime.quantization.quantize_static``.  Each peer is run in a *fresh
subprocess* so wall time and peak RSS are per-run and comparable with the
qcompile CLI subprocess (``run_measured`` is used for both).  Peak RSS is the
ru_maxrss that ``os.wait4`` returns for that very process, forked from a tiny
trampoline so the benchmark's own RSS does not leak into it (see _TRAMPOLINE).

A peer = fix input shape (models ship with dynamic dims) -> convert opset to
>= 13 (per-channel QDQ needs it; PP-OCR det is opset 12, cls opset 11) ->
``quant_pre_process`` -> ``quantize_static(QDQ, per_channel=True,
weight_type=QInt8, activation_type=QUInt8|QInt8, calibrate_method=
MinMax|Percentile|Entropy)`` with ORT's default extra options.  Wall time covers
all of it plus interpreter start-up (as for the qcompile CLI).

Also: ``run_model`` / ``compare`` / ``evaluate`` (cosine, SQNR dB, max-abs per
output) and ``latency`` (median ms, ORT CPU, ORT_ENABLE_ALL, 2 intra-op threads).

CLI (peers only, e.g. to try them without qcompile)::

    python tools/peers.py MODEL.onnx --calib C.npz --input-shape x:1,3,48,192 \
        --out DIR [--eval E.npz] [--peers minmax-u8,entropy-s8]
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PeerSpec", "PEERS", "parse_shape", "shape_arg", "prepare_model", "run_measured", "quantize_peer",
           "run_peers", "activation_mb_per_sample", "auto_calib_stride", "load_inputs", "run_model", "compare", "evaluate", "latency", "latency_many",
           "model_size_mb", "main"]


_ACT_TAG = {"QUInt8": "u8", "QInt8": "s8"}


@dataclass(frozen=True)
class PeerSpec:
    key: str                 # short CLI key, e.g. "minmax-u8"
    calibrate_method: str    # onnxruntime.quantization.CalibrationMethod member name
    activation_type: str     # onnxruntime.quantization.QuantType member name

    @property
    def name(self) -> str:
        return f"ort-qdq {self.calibrate_method} {_ACT_TAG[self.activation_type]}"


PEERS: tuple[PeerSpec, ...] = tuple(
    PeerSpec(f"{m.lower()}-{_ACT_TAG[a]}", m, a)
    for a in ("QUInt8", "QInt8") for m in ("MinMax", "Percentile", "Entropy"))


def jsonable(o):
    """`o` with numpy scalars, non-finite floats and paths made JSON-writable (bench.json)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return jsonable(o.item())
    if isinstance(o, Path):
        return str(o)
    return o


def run_environment(script: str, argv: list[str]) -> dict:
    """Where and with what a bench ran: date, CPU, versions, git commit (+dirty) and the
    command line that reproduces it (`script` is the bench's __file__)."""
    import datetime
    import platform
    import shlex

    import onnx
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from importlib.metadata import version
        qcompile_version = version("qcompile")
    except Exception:  # noqa: BLE001 - not installed: say so, don't fail the bench
        qcompile_version = "?"
    root = str(Path(script).resolve().parents[1])
    try:
        git = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        git += "+dirty" if dirty else ""
    except Exception:  # noqa: BLE001
        git = "?"
    exe = os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(root) else sys.executable
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), cpu=cpu,
                nproc=os.cpu_count(), platform=f"{platform.system()} {platform.release()}",
                python=sys.version.split()[0], onnxruntime=onnxruntime.__version__, onnx=onnx.__version__,
                qcompile=qcompile_version, git=git,
                command=shlex.join([exe, os.path.relpath(script, os.getcwd()), *argv]))


def parse_shape(spec) -> dict[str, list[int]]:
    """``"x:1,3,640,640 y:1,4"`` / ``{"x": (1,3,640,640)}`` -> ``{"x": [1,3,640,640]}``."""
    if isinstance(spec, dict):
        return {k: [int(d) for d in v] for k, v in spec.items()}
    out = {}
    for part in str(spec).replace(";", " ").split():
        name, _, dims = part.rpartition(":")
        if not name:
            raise ValueError(f"bad input shape {part!r}; expected NAME:D0,D1,...")
        out[name] = [int(d) for d in dims.split(",")]
    return out


def shape_arg(shapes: dict[str, list[int]]) -> str:
    return " ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.items())


def model_size_mb(path) -> float:
    """Model file size plus any external-data files next to it (MB = 1e6 bytes)."""
    p = Path(path)
    size = p.stat().st_size
    try:
        import onnx
        m = onnx.load(str(p), load_external_data=False)
        locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        size += sum((p.parent / loc).stat().st_size for loc in locs if (p.parent / loc).is_file())
    except Exception:
        pass
    return size / 1e6


# ----------------------------------------------------------------- model prep
def prepare_model(src, dst, input_shapes, opset: int = 13) -> Path:
    """Fix graph input dims, drop stale output/value_info shapes, convert to opset >= ``opset``.

    Why: quant_pre_process / calibration want static shapes, and per-channel
    QDQ (axis attribute on Q/DQ) needs opset 13.
    """
    import onnx
    from onnx import version_converter

    shapes = parse_shape(input_shapes)
    m = onnx.load(str(src))
    names = [i.name for i in m.graph.input]
    for name, dims in shapes.items():
        if name not in names:
            raise ValueError(f"model has no input {name!r} (inputs: {names})")
        vi = next(i for i in m.graph.input if i.name == name)
        tdims = vi.type.tensor_type.shape.dim
        if len(tdims) != len(dims):
            raise ValueError(f"input {name!r} has rank {len(tdims)}, shape given {dims}")
        for d, v in zip(tdims, dims):
            d.Clear()
            d.dim_value = v
    for o in m.graph.output:               # re-inferred below
        for d in o.type.tensor_type.shape.dim:
            d.Clear()
    del m.graph.value_info[:]
    cur = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if cur < opset:
        m = version_converter.convert_version(m, opset)
    m = onnx.shape_inference.infer_shapes(m)
    onnx.save(m, str(dst))
    return Path(dst)


# ------------------------------------------------------- measured subprocesses
def _tree_rss_kb(pid: int) -> int:
    """Current RSS of pid and its descendants (best effort, /proc)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def _meminfo_mb() -> tuple[float, float] | None:
    """(MemTotal, MemAvailable) in MiB, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: int(l.split()[1]) for l in f}
        return info["MemTotal"] / 1024, info.get("MemAvailable", info["MemTotal"]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _default_mem_limit_mb() -> float:
    """85% of RAM, but never more than what is available now minus 1 GiB (shared box)."""
    mi = _meminfo_mb()
    return max(1024.0, min(0.85 * mi[0], mi[1] - 1024)) if mi else float("inf")


# Why a trampoline: on Linux a child's ru_maxrss (wait4 / RUSAGE_CHILDREN /
# even its own RUSAGE_SELF) starts from the hiwater RSS of the process it was
# forked from, so a child of a 2 GB benchmark process "peaks" at >= 2 GB.  A
# tiny ``python -S`` process forks the real command from its own ~10 MB image and
# reports the grandchild's exact ru_maxrss and wall time (fork -> exit).
_TRAMPOLINE = r"""
import json, os, sys, time
cmd, res = json.loads(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        sys.stderr.write("exec %s failed: %s\n" % (cmd[0], e))
    os._exit(127)
_, st, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(res, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(st), "wall_s": wall, "maxrss_kb": ru.ru_maxrss}, f)
sys.exit(0)
"""


def run_measured(cmd: list[str], *, timeout: float | None = None, cwd=None, env=None,
                 mem_limit_mb: float | None = None, log_path=None) -> dict:
    """Run ``cmd`` (in its own session); return rc, wall_s, peak_rss_mb, stdout, stderr, error.

    wall_s / peak_rss_mb are exact for ``cmd`` itself (see _TRAMPOLINE; RSS also
    covers descendants it waited for).  A watchdog thread kills the process
    group on timeout or when the tree's RSS exceeds ``mem_limit_mb`` (default:
    min(85% of RAM, MemAvailable - 1 GiB)) so one peer cannot take the machine
    down; that is reported as ``error``, never raised, and peak_rss_mb is then
    the watchdog's sampled tree peak.
    """
    import threading
    mem_limit_mb = _default_mem_limit_mb() if mem_limit_mb is None else mem_limit_mb
    fd, res_path = tempfile.mkstemp(prefix="qc-measure-", suffix=".json")
    os.close(fd)
    os.unlink(res_path)
    tramp = [sys.executable, "-S", "-c", _TRAMPOLINE, json.dumps([str(c) for c in cmd]), res_path]
    with tempfile.TemporaryFile("w+", errors="replace") as out, \
            tempfile.TemporaryFile("w+", errors="replace") as err:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(tramp, stdout=out, stderr=err, cwd=cwd, env=env,
                                    start_new_session=True)
        except OSError as exc:
            return dict(rc=None, wall_s=0.0, peak_rss_mb=None, tree_rss_peak_mb=None,
                        stdout="", stderr="", error=f"could not start {cmd[0]}: {exc}")
        done = threading.Event()
        state = {"killed": None, "tree_peak_kb": 0}

        def watch():
            while not done.wait(0.1):
                rss = _tree_rss_kb(proc.pid)
                state["tree_peak_kb"] = max(state["tree_peak_kb"], rss)
                elapsed = time.perf_counter() - t0
                if timeout is not None and elapsed > timeout:
                    state["killed"] = f"timeout after {timeout:.0f}s"
                elif rss / 1024 > mem_limit_mb:
                    state["killed"] = (f"killed: tree RSS {rss / 1024:.0f} MB > limit "
                                       f"{mem_limit_mb:.0f} MB")
                if state["killed"]:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        proc.wait()
        outer_wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    try:
        with open(res_path) as f:
            res = json.load(f)
        os.unlink(res_path)
    except (OSError, ValueError):
        res = None
    if log_path:
        Path(log_path).write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    tree_peak = state["tree_peak_kb"] / 1024
    if res:
        rc, wall, peak = res["rc"], res["wall_s"], res["maxrss_kb"] / 1024
    else:   # killed (or trampoline failed): fall back to outer numbers
        rc, wall, peak = proc.returncode, outer_wall, tree_peak or None
    error = state["killed"]
    if not error and res is None:
        error = f"measurement trampoline failed (rc={proc.returncode}): {stderr.strip()[-300:]}"
    if not error and rc != 0:
        tail = (stderr.strip() or stdout.strip()).splitlines()[-6:]
        sig = f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else ""
        error = f"exit code {rc}{sig}: " + " | ".join(tail)[-600:]
    return dict(rc=rc, wall_s=wall, peak_rss_mb=peak, tree_rss_peak_mb=tree_peak,
                stdout=stdout, stderr=stderr, error=error)


# ------------------------------------------------------------------- peers
def quantize_peer(model_path, calib_npz, input_shape, out_path, *, calibrate_method="MinMax",
                  activation_type="QUInt8", calib_stride: int | None = None,
                  timeout: float | None = 3600, python: str = sys.executable,
                  mem_limit_mb: float | None = None, log_path=None,
                  hide_torch: bool = True) -> dict:
    """One quantize_static peer in a fresh subprocess.

    ``calib_stride`` sets ORT's ``extra_options["CalibStridedMinMax"]``: calibrate
    in chunks of that many samples (despite the name it applies to every
    method).  ``None`` = ORT defaults, which keep *all* intermediate outputs of
    all calibration samples in memory for the histogram methods.
    ``hide_torch``: make ``import torch`` unavailable in the child (see
    _child_main) so the peer is measured as in a torch-free environment.

    Returns {status, wall_s, peak_rss_mb, size_mb, out, phases, error}; never
    raises for a crashing peer (the error is recorded instead).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.exists():
        out_path.unlink()
    spec = dict(model=str(model_path), calib=str(calib_npz), shape=parse_shape(input_shape),
                out=str(out_path), method=calibrate_method, act=activation_type, stride=calib_stride,
                hide_torch=hide_torch)
    # The child's scratch (and ORT's ort.quant.* dirs, via TMPDIR) live in a dir
    # the parent owns, so they are cleaned up even when the child is SIGKILLed.
    with tempfile.TemporaryDirectory(prefix="qc-peer-") as scratch:
        spec["scratch"] = scratch
        env = dict(os.environ, TMPDIR=scratch)
        r = run_measured([python, str(Path(__file__).resolve()), "_child", json.dumps(spec)],
                         timeout=timeout, mem_limit_mb=mem_limit_mb, log_path=log_path, env=env)
    report = {}
    for line in reversed(r["stdout"].splitlines()):
        if line.startswith("@@PEER "):
            report = json.loads(line[7:])
            break
    error = report.get("error") or r["error"]
    ok = r["rc"] == 0 and not error and out_path.is_file()
    if not ok and not error:
        error = "child finished without writing the output model"
    return dict(status="ok" if ok else "error", rc=r["rc"], wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"],
                child_rss_mb=report.get("maxrss_mb"), size_mb=model_size_mb(out_path) if ok else None,
                out=str(out_path) if ok else None, phases=report.get("phases", {}),
                warnings=report.get("warnings", []), error=error)


def _is_mem_kill(r: dict) -> bool:
    err = r.get("error") or ""
    return (err.startswith("killed: tree RSS") or "MemoryError" in err
            or (r.get("rc") == -9 and not err.startswith("timeout")))   # kernel OOM killer


def activation_mb_per_sample(model_path, input_shape) -> float:
    """Sum of float activation sizes (MB) for one sample, from ONNX shape inference.

    The histogram calibrators (Percentile/Entropy) keep roughly this much per
    calibration sample in memory when run with ORT defaults.
    """
    import onnx
    with tempfile.TemporaryDirectory(prefix="qc-act-") as tmp:
        m = onnx.load(str(prepare_model(model_path, Path(tmp) / "m.onnx", input_shape)))
    sizes = {1: 4, 10: 2, 11: 8, 16: 2}        # float, float16, double, bfloat16
    total = 0
    for vi in [*m.graph.value_info, *m.graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type in sizes and dims and all(dims):
            total += int(np.prod(dims)) * sizes[tt.elem_type]
    return total / 1e6


def auto_calib_stride(model_path, input_shape, n_calib: int, budget_mb: float | None = None) -> int | None:
    """None (= ORT defaults) if all ``n_calib`` samples' activations fit in ``budget_mb``
    (default: 35% of MemAvailable), else the largest divisor of n_calib that fits."""
    if budget_mb is None:
        mi = _meminfo_mb()
        budget_mb = 0.35 * mi[1] if mi else float("inf")
    per = activation_mb_per_sample(model_path, input_shape)
    if per * n_calib <= budget_mb:
        return None
    fits = [d for d in range(1, n_calib + 1) if n_calib % d == 0 and d * per <= budget_mb]
    return max(fits, default=1)


def run_peers(model_path, calib_npz, input_shape, out_dir, peers=None, *,
              oom_retry_stride: int | None = 8, **kw) -> list[dict]:
    """Run each PeerSpec (default: all 6) sequentially; one result dict per peer.

    With ORT defaults the Percentile/Entropy calibrators hold every intermediate
    tensor of every calibration sample (PP-OCR det @640x640 x 32 samples: >20 GB).
    If a peer is killed for memory, it is re-run with
    ``CalibStridedMinMax=oom_retry_stride``; the result then carries
    ``calib_stride`` and the first attempt under ``default_attempt``.
    """
    out_dir = Path(out_dir)
    res = []
    for p in peers or PEERS:
        args = (model_path, calib_npz, input_shape, out_dir / f"{p.key}.onnx")
        qkw = dict(calibrate_method=p.calibrate_method, activation_type=p.activation_type, **kw)
        r = quantize_peer(*args, log_path=out_dir / f"{p.key}.log", **qkw)
        stride = kw.get("calib_stride")
        row = dict(method=p.name + (f" (stride {stride})" if stride else ""), key=p.key,
                   calib_stride=stride, **r)
        if r["status"] != "ok" and oom_retry_stride and not kw.get("calib_stride") and _is_mem_kill(r):
            qkw["calib_stride"] = oom_retry_stride
            r2 = quantize_peer(*args, log_path=out_dir / f"{p.key}.stride{oom_retry_stride}.log", **qkw)
            first = {k: row[k] for k in ("status", "wall_s", "peak_rss_mb", "error")}
            row = dict(method=f"{p.name} (stride {oom_retry_stride})", key=p.key,
                       calib_stride=oom_retry_stride, default_attempt=first, **r2)
        res.append(row)
    return res


class _NpzReader:
    """CalibrationDataReader over an npz: one batch-1 sample per get_next()."""

    def __init__(self, npz, input_names):
        with np.load(npz) as z:
            keys = list(z.files)
            if set(input_names) <= set(keys):
                self.arrays = {n: z[n] for n in input_names}
            elif len(input_names) == len(keys):
                self.arrays = {n: z[k] for n, k in zip(input_names, keys)}
            else:
                raise ValueError(f"calib npz keys {keys} do not match inputs {input_names}")
        self.n = len(next(iter(self.arrays.values())))
        self.set_range(0, self.n)

    def __len__(self):
        return self.n

    def set_range(self, start_index, end_index):
        self.i, self.end = start_index, min(end_index, self.n)

    def get_next(self):
        if self.i >= self.end:
            return None
        d = {k: v[self.i:self.i + 1] for k, v in self.arrays.items()}
        self.i += 1
        return d

    def rewind(self):
        self.set_range(0, self.n)

    def __iter__(self):
        # iteration (as onnxruntime's CalibrationDataReader): what its GPTQ / SmoothQuant data loaders use
        while (d := self.get_next()) is not None:
            yield d


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss not inherited at fork)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _child_main(spec_json: str) -> int:
    """Runs inside the fresh subprocess: prepare -> pre_process -> quantize_static."""
    import warnings
    phases, warns = {}, []
    try:
        spec = json.loads(spec_json)
        if spec.get("hide_torch", True):
            # onnxruntime.tools/__init__ imports torch merely because it is installed
            # (find_spec), which costs quant_pre_process ~1 s and ~250 MB that a
            # torch-free ORT install would not pay; the quantizer never uses it.
            sys.modules.setdefault("torch", None)
        t = time.perf_counter()
        import onnx  # noqa: F401
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
        phases["import_s"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory(prefix="child-", dir=spec.get("scratch")) as tmp:
            t = time.perf_counter()
            fixed = prepare_model(spec["model"], Path(tmp) / "fixed.onnx", spec["shape"])
            phases["prepare_s"] = time.perf_counter() - t
            t = time.perf_counter()
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(fixed), str(pre))
            except Exception as exc:   # symbolic shape inference is the usual culprit
                warns.append(f"quant_pre_process failed ({type(exc).__name__}: {exc}); "
                             "retried with skip_symbolic_shape=True")
                quant_pre_process(str(fixed), str(pre), skip_symbolic_shape=True)
            phases["pre_process_s"] = time.perf_counter() - t
            t = time.perf_counter()
            reader = _NpzReader(spec["calib"], list(spec["shape"]))
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")
                extra = {"CalibStridedMinMax": spec["stride"]} if spec.get("stride") else {}
                quantize_static(str(pre), spec["out"], reader, quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType[spec["act"]],
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod[spec["method"]],
                                extra_options=extra)
            warns += sorted({str(w.message)[:200] for w in wl})[:5]
            phases["quantize_s"] = time.perf_counter() - t
        print("@@PEER " + json.dumps(dict(phases=phases, maxrss_mb=_vm_hwm_mb(), warnings=warns)),
              flush=True)
        return 0
    except BaseException as exc:  # report, do not hide
        traceback.print_exc()
        print("@@PEER " + json.dumps(dict(phases=phases, maxrss_mb=_vm_hwm_mb(), warnings=warns,
                                          error=f"{type(exc).__name__}: {exc}"[:800])), flush=True)
        return 1


# --------------------------------------------------------------- evaluation
ORT_LEVELS = ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC", "ORT_DISABLE_ALL")


def _session(model_path, threads: int = 2, level: str = "ORT_ENABLE_ALL"):
    """CPU session; ``level`` names a GraphOptimizationLevel member (the benchmark always uses
    ORT_ENABLE_ALL, except for a peer model that only loads at a lower level -- it says so)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def load_inputs(npz, input_names=None, limit: int | None = None) -> dict[str, np.ndarray]:
    """npz -> {input_name: array}; positional mapping if keys differ from names."""
    with np.load(npz) as z:
        keys = list(z.files)
        arrays = {k: z[k][:limit] if limit else z[k] for k in keys}
    if input_names is None or set(input_names) <= set(keys):
        return {n: arrays[n] for n in (input_names or keys)}
    if len(input_names) != len(keys):
        raise ValueError(f"npz keys {keys} do not match model inputs {input_names}")
    return dict(zip(input_names, arrays.values()))


def run_model(model_path, inputs, *, limit: int | None = None, threads: int = 2,
              level: str = "ORT_ENABLE_ALL") -> dict[str, np.ndarray]:
    """Run a model sample by sample (batch 1: quantized models have a fixed batch).

    ``inputs``: npz path or {name: array}.  Returns {output_name: stacked array}.
    """
    sess = _session(model_path, threads, level)
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs(inputs, names, limit)
    else:
        feeds = {k: (v[:limit] if limit else v) for k, v in inputs.items()}
        if not set(names) <= set(feeds):
            feeds = dict(zip(names, feeds.values()))
    n = len(next(iter(feeds.values())))
    outs = [o.name for o in sess.get_outputs()]
    res: dict[str, list] = {o: [] for o in outs}
    for i in range(n):
        for o, y in zip(outs, sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})):
            res[o].append(y)
    return {o: np.concatenate(v) for o, v in res.items()}


def compare(outputs: dict, reference: dict) -> dict[str, dict[str, float]]:
    """Per output: cosine, SQNR dB = 10 log10(sum ref^2 / sum (ref-x)^2), max-abs error.

    Outputs are matched by name, falling back to position when names differ.
    """
    if not set(reference) <= set(outputs):
        outputs = dict(zip(reference, outputs.values()))
    res = {}
    for name, ref in reference.items():
        r = np.asarray(ref, np.float64).ravel()
        x = np.asarray(outputs[name], np.float64).ravel()
        if r.shape != x.shape:
            raise ValueError(f"output {name!r}: shape {np.shape(outputs[name])} vs ref {np.shape(ref)}")
        err = float(np.sum((r - x) ** 2))
        sig = float(np.sum(r ** 2))
        denom = float(np.linalg.norm(r) * np.linalg.norm(x))
        res[name] = dict(
            cosine=float(np.dot(r, x) / denom) if denom > 0 else float("nan"),
            sqnr_db=float(10 * np.log10(sig / err)) if err > 0 else float("inf"),
            max_abs=float(np.max(np.abs(r - x))) if r.size else 0.0)
    return res


def evaluate(model_path, eval_npz, reference_outputs, *, limit: int | None = None,
             threads: int = 2) -> dict[str, dict[str, float]]:
    """Run ``model_path`` on ``eval_npz``; compare with ``reference_outputs``
    ({name: array} or an npz of them, e.g. from ``run_model`` on the fp32 model)."""
    if isinstance(reference_outputs, (str, os.PathLike)):
        with np.load(reference_outputs) as z:
            reference_outputs = {k: z[k] for k in z.files}
    if limit:
        reference_outputs = {k: v[:limit] for k, v in reference_outputs.items()}
    n = len(next(iter(reference_outputs.values())))
    return compare(run_model(model_path, eval_npz, limit=n, threads=threads), reference_outputs)


def _random_feeds(sess, shape, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    inputs = sess.get_inputs()
    if isinstance(shape, (tuple, list)):
        shape = {inputs[0].name: list(shape)}
    shapes = parse_shape(shape)
    rng = np.random.default_rng(seed)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
    feeds = {}
    for i in inputs:
        dims = [batch, *shapes[i.name][1:]] if i.name in shapes else \
            [batch, *[d if isinstance(d, int) else 1 for d in i.shape[1:]]]
        dt = types.get(i.type, np.float32)
        feeds[i.name] = (rng.standard_normal(dims) if np.issubdtype(dt, np.floating)
                         else rng.integers(0, 2, dims)).astype(dt)
    return feeds


def _timed_runs(sess, feeds, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def latency(model_path, shape, batch: int = 1, runs: int = 30, threads: int = 2,
            warmup: int = 5, seed: int = 0) -> float:
    """Median wall ms of ``sess.run`` after ``warmup`` runs (ORT CPU, ORT_ENABLE_ALL).

    ``shape``: {name: dims} / "x:1,3,640,640" / a dims tuple for single-input
    models; axis 0 is replaced by ``batch``.
    """
    sess = _session(model_path, threads)
    feeds = _random_feeds(sess, shape, batch, seed)
    _timed_runs(sess, feeds, warmup)
    return float(np.median(_timed_runs(sess, feeds, runs)))


def latency_many(models: dict, shape, batch: int = 1, runs: int = 30, threads: int = 2,
                 warmup: int = 5, passes: int = 3, seed: int = 0) -> dict:
    """``latency`` for several models: ``passes`` sequential passes over all of
    them (each: ``warmup`` runs, then the median of ``runs``); per model the
    *lowest* pass median is kept.

    Why: on a shared 2-core box a background burst during one model's slot
    would otherwise be charged to that model alone; taking the best of a few
    passes spaced over time filters such bursts.  (Interleaving single runs
    across sessions was tried and is worse: each switch wakes a cold thread
    pool while the previous one still spins.)  Returns {key: ms} or
    {key: "error: ..."} for a model that fails to load/run.
    """
    sessions, res = {}, {}
    for k, path in models.items():
        try:
            sess = _session(path, threads)
            sessions[k] = (sess, _random_feeds(sess, shape, batch, seed))
        except Exception as exc:
            res[k] = f"error: {type(exc).__name__}: {exc}"[:600]
    best: dict = {}
    for _ in range(max(1, passes)):
        for k, (sess, feeds) in list(sessions.items()):
            try:
                _timed_runs(sess, feeds, warmup)
                med = float(np.median(_timed_runs(sess, feeds, runs)))
            except Exception as exc:
                res[k] = f"error: {type(exc).__name__}: {exc}"[:600]
                del sessions[k]
                continue
            best[k] = min(best.get(k, med), med)
    res.update(best)
    return res


# ----------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return _child_main(argv[1])
    ap = argparse.ArgumentParser(description="Run onnxruntime quantize_static peers.")
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--input-shape", required=True, help="e.g. x:1,3,640,640")
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval", help="eval npz: also report SQNR etc. vs the fp32 model")
    ap.add_argument("--peers", default="", help=f"subset of {','.join(p.key for p in PEERS)}")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--calib-stride", type=int, default=None,
                    help="ORT CalibStridedMinMax (chunked calibration); default: ORT defaults")
    ap.add_argument("--oom-retry-stride", type=int, default=8)
    args = ap.parse_args(argv)
    keys = {s.strip() for s in args.peers.split(",") if s.strip()}
    peers = [p for p in PEERS if not keys or p.key in keys]
    ref = run_model(args.model, args.eval) if args.eval else None
    for r in run_peers(args.model, args.calib, args.input_shape, args.out, peers, timeout=args.timeout,
                       calib_stride=args.calib_stride, oom_retry_stride=args.oom_retry_stride):
        if r.get("default_attempt"):
            print(f"{r['method']:28s} default run failed: {r['default_attempt']['error']}")
        line = (f"{r['method']:28s} {r['status']:5s} wall {r['wall_s']:7.1f}s "
                f"rss {r['peak_rss_mb'] or 0:7.0f}MB")
        if r["status"] == "ok":
            line += f" size {r['size_mb']:.2f}MB"
            if ref is not None:
                m = next(iter(evaluate(r["out"], args.eval, ref).values()))
                line += f" sqnr {m['sqnr_db']:.2f}dB cos {m['cosine']:.5f}"
        else:
            line += f" ERROR {r['error']}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
