"""Statistics over the calibration stream computed by several processes (`--workers N`).

The batches are dealt round-robin to N worker processes (batch i to worker i mod N). Each
worker runs the same stream as a single process would (passes/activation_stream.py: the
whole model in one session, or block by block under `--max-memory`, then with 1/N of the
bound each) over its share and feeds a `Collector`; as a group of tensors finishes (at the
end, or block by block), each worker sends its partial statistics of that group to the
driver, which merges the N partials in worker order and hands them to the pass. Statistics
that add (Hessians, sums, extremes, counts) merge to the single-process ones up to float
summation order; histograms merge bin by bin (compiler/observers.py).

Workers are forked from the compile, so they share its graph as it is at that pass (weights
derived lazily, spilled, or still in the input's data file included) without writing it out.
A worker that dies (killed for memory, a crash in onnxruntime) is started again once, its
groups already received skipped; a second death ends the compile naming the shard. An
error a worker raises (bad data) ends the compile with that error.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import traceback
from typing import Callable, Iterator, Protocol

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError, UsageError
from qcompile.memory_plan import MemoryPlan

from .activation_stream import stream_tensors, tensor_groups

_FORK = multiprocessing.get_context("fork")


class Collector(Protocol):
    """A pass's statistics over streamed tensors, in parts that merge."""

    def update(self, name: str, array: np.ndarray, batch: int) -> None:
        """Fold tensor `name`'s value for batch `batch` (its index in the whole stream) in."""

    def take(self, names: set[str]) -> dict:
        """The statistics of the finished tensors `names`, taken out of the running state."""

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        """Several workers' `take` of the same tensors, in worker order, as one."""


class WorkerDied(UsageError):
    """A calibration worker died twice on the same shard (most often: killed for memory)."""


@dataclasses.dataclass(frozen=True)
class DatasetShard:
    """Every `count`-th batch of `dataset`, from batch `index`: one worker's share."""
    dataset: object
    index: int
    count: int

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    @property
    def description(self) -> str:
        return f"{self.dataset.description} (shard {self.index + 1} of {self.count})"

    def batches(self, batch_size: int, limit: int | None = None, *, exact: bool = False):
        for i, feed in enumerate(self.dataset.batches(batch_size, limit, exact=exact)):
            if i % self.count == self.index:
                yield feed


def collect_groups(model: ir.Model, values: list[ir.Value], dataset, make_collector: Callable[[], Collector], *,
                   samples: int, label: str, progress: bool, memory: MemoryPlan | None = None, workers: int = 1,
                   batch_size: int = 1) -> Iterator[dict]:
    """Yield the merged statistics of each group of `values` as it finishes (tensor_groups):
    in this process when `workers` is 1, else across that many forked workers."""
    if workers <= 1:
        yield from _local_groups(model, values, dataset, make_collector(), samples=samples, label=label,
                                 progress=progress, memory=memory, batch_size=batch_size)
        return
    batches = -(-min(samples, dataset.num_samples) // max(batch_size, 1))
    workers = max(1, min(workers, batches))     # never a worker without a batch
    if memory is not None:
        _check_share(model, memory, workers)
    pool = [_Worker(i, workers, model, values, dataset, make_collector, samples=samples, label=label,
                    memory=_share(memory, i, workers), batch_size=batch_size) for i in range(workers)]
    cls = type(make_collector())
    try:
        for worker in pool:
            worker.start()
        while True:
            parts = [worker.next_group() for worker in pool]
            if all(p is None for p in parts):
                return
            if any(p is None for p in parts):
                raise RuntimeError(f"{label}: the workers' streams ended at different groups")
            yield cls.merge(parts)
    finally:
        for worker in pool:
            worker.stop()


def _local_groups(model, values, dataset, collector: Collector, *, samples, label, progress, memory, batch_size):
    stream = stream_tensors(model, values, dataset, samples=samples, label=label, progress=progress,
                            batch_size=batch_size, memory=memory)
    first, step = (dataset.index, dataset.count) if isinstance(dataset, DatasetShard) else (0, 1)
    seen: dict[str, int] = {}   # batches of each tensor so far: a tensor's batches come in order
    for arrays, finished in tensor_groups(stream):
        if finished:
            yield collector.take(finished)
        for name, array in arrays.items():
            k = seen.get(name, 0)
            seen[name] = k + 1
            collector.update(name, array, first + k * step)


def _share(memory: MemoryPlan | None, index: int, count: int) -> MemoryPlan | None:
    """Worker `index`'s part of the bound: 1/count of it, its own scratch folder."""
    if memory is None:
        return None
    return dataclasses.replace(memory, max_bytes=memory.max_bytes // count, scratch=memory.scratch / f"worker-{index}")


def _check_share(model: ir.Model, memory: MemoryPlan, workers: int) -> None:
    """Refuse, before forking, a share of the bound too small for one block."""
    from qcompile.layerwise import partition_for
    share = _share(memory, 0, workers)
    try:
        partition_for(model, share)
    except UsageError as err:
        raise UsageError(f"with --workers {workers} each worker streams under 1/{workers} of --max-memory "
                         f"({share.max_bytes / 1e9:.2f} GB): {err}",
                         hint=f"use fewer --workers, or raise --max-memory ({err.hint})" if err.hint else
                         "use fewer --workers, or raise --max-memory") from None


class _Worker:
    """One forked process streaming one shard; the driver reads its groups in order."""

    def __init__(self, index, count, model, values, dataset, make_collector, *, samples, label, memory, batch_size):
        self.index, self.count, self.label = index, count, label
        self._run = lambda: _local_groups(model, values, DatasetShard(dataset, index, count), make_collector(),
                                          samples=samples, label=label, progress=False, memory=memory,
                                          batch_size=batch_size)
        self.received = 0       # groups the driver has taken from this shard
        self.restarts = 0
        self._proc = self._conn = None

    def start(self) -> None:
        read, write = _FORK.Pipe(duplex=False)
        self._proc = _FORK.Process(target=_worker_main, args=(write, self._run, self.received),
                                   name=f"qcompile-{self.label}-worker-{self.index}", daemon=True)
        self._proc.start()
        write.close()           # the driver's copy: EOF once the worker is gone
        self._conn = read

    def next_group(self) -> dict | None:
        """This shard's next group's statistics; None once the shard is done."""
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                self._died()
                continue
            if kind == "group":
                self.received += 1
                return payload
            if kind == "done":
                return None
            raise payload           # an error the worker raised: the same error here

    def _died(self) -> None:
        self._proc.join()
        code = self._proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        if self.restarts >= 1:
            raise WorkerDied(f"{self.label}: the worker for calibration shard {self.index + 1} of {self.count} "
                             f"(every {self.count}th batch from batch {self.index}) died twice ({how})",
                             hint="a worker killed for memory (SIGKILL) needs fewer --workers or a lower "
                                  "--max-memory share; run with --workers 1 to see the error in this process")
        self.restarts += 1
        self._conn.close()
        self.start()

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._proc is not None:
            self._proc.join()
        if self._conn is not None:
            self._conn.close()


def _worker_main(conn, run, skip: int) -> None:
    """In the forked worker: stream, send each group after the first `skip`, then "done"."""
    code = 0
    try:
        for i, part in enumerate(run()):
            if i >= skip:
                conn.send(("group", part))
        conn.send(("done", None))
    except QCompileError as err:
        conn.send(("error", err))
    except BaseException:    # noqa: BLE001 - a bug: the driver reports it with the worker's traceback
        conn.send(("error", RuntimeError(f"in a calibration worker:\n{traceback.format_exc()}")))
        code = 1
    finally:
        conn.close()
        os._exit(code)   # not the driver's exit handlers (its scratch folders, its output staging)
