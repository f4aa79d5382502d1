"""Latency, one way: each (model, pass) in a fresh process (`child.py latency`), warm-up runs,
then the median of timed runs, per model the best *quiet* pass (other processes took less than
a share of the box while it timed). A decoder's one-token step is timed the same way in its
own child (`child.py decode_latency`): float and compiled sessions alternating whole decode
loops in one fresh process, the ratio taken within the process.

Why a process each: in one long-lived process, running one model can leave the process
slower for every later session (seen here: after a MatMulNBits int8 model had run, fp32 MiniLM
went from 9 to 12.6 ms and stayed there, not reproducibly); a fresh process per measurement
gives the same number within ~5 % and keeps only one session in memory.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from .evaluate import random_feeds, session
from .measure import CpuWatch, child_command, child_result


def timed_runs(sess, feeds, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


# --------------------------------------------------------------------- latency
def paired_latency_pass(spec: dict) -> dict:
    """In the child: several models in one process, timed in alternating rounds (A B C, C B A,
    ...), per model the median of its rounds' medians. For ratios of a few per cent, which
    this host's drift between fresh processes hides (fp32 MiniLM b16 moved 15 % across runs):
    every model sees the same drift. The intra-op threads do not spin between runs: with
    spinning on, the idle sessions' pools spin against the one being timed (MiniLM b1 came out
    2-3x its fresh-process time, unevenly across models)."""
    try:
        sessions = {k: session(p, spec["threads"], spin=False) for k, p in spec["paths"].items()}
        feeds = {k: random_feeds(s, spec["shapes"], spec["batch"], spec.get("seed", 0)) for k, s in sessions.items()}
        for k, s in sessions.items():
            timed_runs(s, feeds[k], spec["warmup"])
        rounds: dict[str, list[float]] = {k: [] for k in sessions}
        order = list(sessions)
        for i in range(spec["rounds"]):
            for k in (order if i % 2 == 0 else order[::-1]):
                rounds[k].append(float(np.median(timed_runs(sessions[k], feeds[k], spec["runs"]))))
        return {"ms": {k: float(np.median(v)) for k, v in rounds.items()}, "rounds": spec["rounds"],
                "runs_per_round": spec["runs"]}
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}"[:600])


def paired_latency(models: dict, shapes: dict, *, batch: int, threads: int = 2, rounds: int = 12, runs: int = 5,
                   warmup: int = 3, python: str = sys.executable) -> dict:
    """{key: ms} of `paired_latency_pass` in one fresh child process, or {"error": ...}."""
    spec = dict(paths={k: str(v) for k, v in models.items()}, shapes=shapes, batch=batch, threads=threads,
                rounds=rounds, runs=runs, warmup=warmup)
    try:
        p = subprocess.run(child_command(python, "paired_latency", spec), capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "paired latency process timed out"}
    return child_result(p.stdout) or {
        "error": f"paired latency process exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"}


def latency_pass(spec: dict) -> dict:
    """In the child: one model, one batch size, one pass (warm-up, then timed runs)."""
    try:
        sess = session(spec["path"], spec["threads"], spec.get("level") or "ORT_ENABLE_ALL")
        feeds = random_feeds(sess, spec["shapes"], spec["batch"], spec.get("seed", 0))
        warm = timed_runs(sess, feeds, 2)
        per_run_s = warm[-1] / 1e3
        runs, budget, slow = spec["runs"], spec["budget_s"], False
        if per_run_s * runs > budget:      # slow: fewer runs (>= 10); the parent then skips later passes
            runs, slow = max(10, min(runs, int(budget / max(per_run_s, 1e-9)))), True
        else:   # the rest of the warm-up: at least `warmup` runs and 0.3 s (sub-ms models need the time)
            t_end, done = time.perf_counter() + 0.3, 2
            while done < spec["warmup"] or time.perf_counter() < t_end:
                timed_runs(sess, feeds, 1)
                done += 1
        with CpuWatch() as cw:      # what *other* processes took while we timed
            ms = float(np.median(timed_runs(sess, feeds, runs)))
        return dict(ms=ms, runs=runs, slow=slow, other=cw.other_frac)
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}"[:600])


def latency_many(models: dict, shapes: dict, batch: int = 1, runs: int = 30, threads: int = 2,
                 warmup: int = 5, passes: int = 3, seed: int = 0, pass_budget_s: float = 150.0,
                 python: str = sys.executable, levels: dict | None = None, quiet: float = 0.10,
                 max_passes: int | None = None) -> dict:
    """``passes`` sequential passes over all models, each ``warmup`` runs then the median of
    ``runs``, per model the best pass kept -- every (model, pass) in a **fresh process**
    (`child.py latency`), with a time budget, and only *quiet* passes count when there are any
    (seven PP-OCR det sessions at 16x3x640x640 would hold > 15 GB of arenas together in one).

    Why quiet passes: on a shared 2-core box another job's burst during a model's timed runs
    slows it by up to 3x (seen: two byte-identical PP-OCR det artifacts at 112 and 39 ms in
    the same run), and best-of-3 does not always catch a clean pass.  Each pass reports the
    share of the box *other* processes used while it timed (``measure.CpuWatch``); a pass
    is quiet when that is < ``quiet``.  A model without a quiet pass after ``passes`` gets
    more passes, up to ``max_passes`` (default 3 x ``passes``); its best quiet pass is kept,
    or, if none came, its best pass, flagged with the contention it had.

    Budget: if the second warm-up run says ``runs`` runs would take more than
    ``pass_budget_s``, that model gets fewer runs (>= 10) in a single pass (e.g.
    quantize_dynamic's ConvInteger on PP-OCR det at batch 16); such a model gets at most one
    extra pass when that one was not quiet.

    ``levels``: {key: graph optimization level} for models that only load below ORT_ENABLE_ALL.

    Returns {key: {"ms", "runs", "passes", "other", "quiet"}} or {key: "error: ..."}.
    """
    max_passes = max(passes, max_passes if max_passes is not None else 3 * passes)
    got: dict = {}          # key -> [(ms, runs, other)]
    res: dict = {}
    single: set = set()

    def has_quiet(k):
        return any(o is not None and o < quiet for _, _, o in got.get(k, []))

    for i in range(max(1, max_passes)):
        todo = []
        for k in models:
            n = len(got.get(k, []))
            if k in res:
                continue
            if k in single:
                if n >= 2 or (n >= 1 and has_quiet(k)):
                    continue
            elif n >= passes and (has_quiet(k) or n >= max_passes):
                continue
            todo.append(k)
        if not todo:
            break
        for k in todo:
            spec = dict(path=str(models[k]), shapes=shapes, batch=batch, runs=runs, threads=threads, warmup=warmup,
                        seed=seed, budget_s=pass_budget_s, level=(levels or {}).get(k))
            try:
                p = subprocess.run(child_command(python, "latency", spec), capture_output=True, text=True,
                                   timeout=max(600.0, 4 * pass_budget_s))
                r = child_result(p.stdout) or {
                    "error": f"latency process exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"}
            except subprocess.TimeoutExpired:
                r = {"error": "latency process timed out"}
            if "error" in r:
                res[k] = f"error: {r['error']}"
                got.pop(k, None)
                continue
            if r["slow"]:
                single.add(k)
            got.setdefault(k, []).append((r["ms"], r["runs"], r.get("other")))
    for k, tries in got.items():
        if k in res:
            continue
        q = [t for t in tries if t[2] is not None and t[2] < quiet]
        ms, n_runs, other = min(q or tries, key=lambda t: t[0])
        res[k] = {"ms": ms, "runs": min(t[1] for t in tries), "passes": len(tries), "other": other,
                  "quiet": bool(q), "quiet_passes": len(q)}
    return res


class _Decoder:
    """One greedy decode with the KV cache fed back: `prefill()` (untimed), then `step()` one
    token at a time, each returning the seconds of its `sess.run`."""

    def __init__(self, sess, prompt: np.ndarray):
        self.sess, self.prompt = sess, prompt
        self.names = [o.name for o in sess.get_outputs()]
        self.past = {i.name: (i.shape[1], i.shape[3], np.int8 if i.type == "tensor(int8)" else np.float32)
                     for i in sess.get_inputs() if i.name.startswith("past_key_values.")}

    def prefill(self) -> None:
        length = self.prompt.shape[1]
        self.total = length
        feeds = {"input_ids": self.prompt, "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.arange(length, dtype=np.int64)[None, :]}
        feeds.update({n: np.zeros((1, h, 0, d), dt) for n, (h, d, dt) in self.past.items()})
        self.outs = dict(zip(self.names, self.sess.run(None, feeds)))

    def step(self) -> float:
        token = self.outs["logits"][:, -1, :].argmax(-1).astype(np.int64)[:, None]
        feeds = {"input_ids": token, "attention_mask": np.ones((1, self.total + 1), np.int64),
                 "position_ids": np.full((1, 1), self.total, np.int64)}
        feeds.update({n: self.outs[n.replace("past_key_values.", "present.", 1)] for n in self.past})
        t0 = time.perf_counter()
        res = self.sess.run(None, feeds)
        dt = time.perf_counter() - t0
        self.outs, self.total = dict(zip(self.names, res)), self.total + 1
        return dt

def _loops(sessions: dict, prompt: np.ndarray, steps: int, loops: int, times: dict | None) -> None:
    """`loops` rounds; in each, every session decodes the same prompt in full, the order
    alternating round by round (A B, B A, ...). Whole loops rather than interleaved steps: an
    idle session's intra-op threads spin for a while after its run (onnxruntime's default),
    which would slow a session stepping right after it on a 2-core box."""
    keys = list(sessions)
    for i in range(loops):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            d = _Decoder(sessions[k], prompt)
            d.prefill()
            ts = [d.step() for _ in range(steps)]
            if times is not None:
                times[k] += ts


def decode_latency_pass(spec: dict) -> dict:
    """In the child: `rounds` times, fresh float and compiled sessions (creation order
    alternating) run alternating decode loops; per model the best round's median step time.
    Why rounds: on this VM one session of a model is sometimes ~10 % slower than
    another session of the same model in the same process (the float-vs-itself control showed
    ratios 0.89-1.16 with one session each), so each model gets several sessions."""
    rounds = {"float": [], "compiled": []}
    with CpuWatch() as watch:
        for rnd in range(spec["rounds"]):
            keys = ["float", "compiled"] if rnd % 2 == 0 else ["compiled", "float"]
            sessions = {k: session(spec[k], spec["threads"]) for k in keys}
            vocab = sessions["float"].get_outputs()[0].shape[-1]
            vocab = vocab if isinstance(vocab, int) else 512
            prompt = np.random.default_rng(spec["seed"]).integers(1, vocab, size=(1, spec["prompt_len"]),
                                                                   dtype=np.int64)
            _loops(sessions, prompt, spec["steps"], spec["warmup_loops"], None)
            times = {k: [] for k in sessions}
            _loops(sessions, prompt, spec["steps"], spec["loops"], times)
            for k, v in times.items():
                rounds[k].append(float(np.median(v)) * 1e3)
            del sessions
    res = {k: dict(median_ms=min(v), rounds_ms=v, steps_per_round=spec["steps"] * spec["loops"])
           for k, v in rounds.items()}
    res["ratio"] = res["compiled"]["median_ms"] / res["float"]["median_ms"]
    res["other_cpu"] = watch.other_frac
    return res


def decode_step_latency(python: str, float_model: str, compiled: str, *, threads: int, prompt_len: int,
                        steps: int, loops: int, warmup_loops: int, rounds: int, passes: int, seed: int = 0) -> dict:
    """ms per one-token step, float and compiled, best of `passes` fresh processes; the
    compiled/float ratio per process, its median over processes."""
    spec = dict(float=float_model, compiled=compiled, threads=threads, prompt_len=prompt_len, steps=steps,
                loops=loops, warmup_loops=warmup_loops, rounds=rounds, seed=seed)
    done = []
    for _ in range(passes):
        r = subprocess.run(child_command(python, "decode_latency", spec), capture_output=True, text=True)
        found = child_result(r.stdout)
        if r.returncode != 0 or found is None:
            return dict(error=" | ".join(r.stderr.strip().splitlines()[-4:])[-600:], passes=done)
        done.append(found)
    passes = done
    ratios = [p["ratio"] for p in passes]
    return dict(float_ms=min(p["float"]["median_ms"] for p in passes),
                compiled_ms=min(p["compiled"]["median_ms"] for p in passes),
                ratio=float(np.median(ratios)), ratios=ratios,
                other_cpu_max=max((p["other_cpu"] or 0.0) for p in passes), passes=passes, spec=spec)
