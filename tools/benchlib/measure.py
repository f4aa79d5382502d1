"""Measuring a benchmark run: fresh measured subprocesses (wall time, exact peak RSS), the
share of the box other processes took meanwhile, the run environment, file sizes, JSON.

Why a fresh subprocess per compile: wall time and peak RSS are then per run and comparable
between qcompile's CLI and every peer (both go through `run_measured`). Peak RSS is the
ru_maxrss `os.wait4` returns for that very process, forked from a tiny trampoline so the
benchmark's own RSS does not leak into it (see _TRAMPOLINE).

The child protocol: every helper process the benches start is `benchlib/child.py KIND SPEC`
(a peer quantizer, one latency pass, one decode-latency pass), which prints one line
`@@RESULT {json}`; `child_command` builds the command and `child_result` reads the line.
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
from pathlib import Path

import numpy as np

CHILD = Path(__file__).resolve().with_name("child.py")
RESULT_TAG = "@@RESULT "


def child_command(python: str, kind: str, spec: dict) -> list[str]:
    """The command running `child.py KIND SPEC` (see the module docstring)."""
    return [python, str(CHILD), kind, json.dumps(spec)]


def child_result(stdout: str) -> dict | None:
    """The child's `@@RESULT` line, parsed (None when it printed none)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def print_result(result: dict) -> None:
    """What a child prints last."""
    print(RESULT_TAG + json.dumps(jsonable(result)), flush=True)


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

def meminfo_mb() -> tuple[float, float] | None:
    """(MemTotal, MemAvailable) in MiB, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: int(l.split()[1]) for l in f}
        return info["MemTotal"] / 1024, info.get("MemAvailable", info["MemTotal"]) / 1024
    except (OSError, KeyError, ValueError):
        return None

def _default_mem_limit_mb() -> float:
    """85% of RAM, but never more than what is available now minus 1 GiB (shared box)."""
    mi = meminfo_mb()
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

def is_mem_kill(r: dict) -> bool:
    err = r.get("error") or ""
    return (err.startswith("killed: tree RSS") or "MemoryError" in err
            or (r.get("rc") == -9 and not err.startswith("timeout")))   # kernel OOM killer

def vm_hwm_mb() -> float | None:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss not inherited at fork)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


class CpuWatch:
    """Share of the box's CPU used by *other* processes (and VM steal) while active.

    Why: on a shared 2-core machine a concurrent job silently inflates compile
    times and latencies; this puts a number on it in the report.
    (/proc/stat busy time minus this process's and its waited children's CPU time.)
    """

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), self._sys_busy(), self._own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        other = (self._sys_busy() - self._busy) - (self._own_cpu() - self._own)
        self.other_frac = max(0.0, other) / max(wall * (os.cpu_count() or 1), 1e-9) \
            if self._busy is not None else None
        return False

    @staticmethod
    def _sys_busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal ...
            return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own_cpu():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
