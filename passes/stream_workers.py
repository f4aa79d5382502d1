"""Statistics over the calibration stream computed by several processes (`--workers N`) or
Ray tasks (`--ray ADDRESS`; compiler/sharding.py).

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

Ray tasks cannot share the compile's memory: the graph goes to them serialized with every
weight inline (under protobuf's 2 GB), each shard's batches with its task, and a task returns
all its groups at its end. Ray retries a crashed task once.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import signal
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import QCompileError, UsageError
from qcompile.memory_plan import MemoryPlan
from qcompile.model_io import fixed_batch_size
from qcompile.pass_context import log
from qcompile.sharding import Sharding, connect_ray

from .activation_stream import stream_tensors, streamed_samples, tensor_groups

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


@dataclasses.dataclass(frozen=True)
class ShardFeeds:
    """One shard's batches, read by the driver and shipped with a Ray task (a machine of the
    cluster need not see the calibration files)."""
    feeds: list
    index: int
    count: int

    @property
    def num_samples(self) -> int:
        return sum(next(iter(feed.values())).shape[0] for feed in self.feeds)

    @property
    def description(self) -> str:
        return f"shard {self.index + 1} of {self.count}"

    def batches(self, batch_size: int, limit: int | None = None, *, exact: bool = False):
        return iter(self.feeds)    # batched by the driver, as the stream asked


def collect_groups(model: ir.Model, values: list[ir.Value], dataset, make_collector: Callable[[], Collector], *,
                   samples: int, label: str, progress: bool, memory: MemoryPlan | None = None,
                   sharding: Sharding = Sharding(), batch_size: int = 1, block_ends: bool = False,
                   sequential: bool = False) -> Iterator[dict]:
    """Yield the merged statistics of each group of `values` as it finishes (tensor_groups):
    in this process, across forked workers (`sharding.workers`), or as Ray tasks (`sharding.ray`).
    `make_collector` must pickle for Ray (a class or a functools.partial of one). `block_ends`
    and `sequential` as stream_tensors takes them; under `sequential` the blocks after a group
    see what the caller rewrote while holding it, which only a stream in this process can: it
    is never sharded."""
    if not sharding.sharded or sequential:
        yield from _local_groups(model, values, dataset, make_collector(), samples=samples, label=label,
                                 progress=progress, memory=memory, batch_size=batch_size, block_ends=block_ends,
                                 sequential=sequential)
        return
    fixed_batch, fixed = fixed_batch_size(model)
    batch = fixed_batch or batch_size
    batches = -(-streamed_samples(model, dataset, samples=samples) // batch)
    if sharding.ray is not None:
        yield from _ray_groups(model, values, dataset, make_collector, samples=samples, label=label, memory=memory,
                               sharding=sharding, batch=batch, exact=fixed, batches=batches)
        return
    workers = min(sharding.workers, batches)     # never a worker without a batch
    if workers <= 1:
        yield from _local_groups(model, values, dataset, make_collector(), samples=samples, label=label,
                                 progress=progress, memory=memory, batch_size=batch_size, block_ends=block_ends)
        return
    if memory is not None:
        _check_share(model, memory, workers)
    log.info("%s: %d worker processes, every %dth batch each", label, workers, workers)
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


def _local_groups(model, values, dataset, collector: Collector, *, samples, label, progress, memory, batch_size,
                  block_ends: bool = False, sequential: bool = False):
    stream = stream_tensors(model, values, dataset, samples=samples, label=label, progress=progress,
                            batch_size=batch_size, memory=memory, block_ends=block_ends, sequential=sequential)
    first, step = (dataset.index, dataset.count) if isinstance(dataset, (DatasetShard, ShardFeeds)) else (0, 1)
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


def _ray_groups(model, values, dataset, make_collector, *, samples, label, memory, sharding, batch, exact, batches):
    """The shards as Ray tasks: the graph (weights inline) and each shard's batches shipped,
    every group's partials returned at the end of the task, merged here in shard order."""
    ray = connect_ray(sharding.ray)
    count = sharding.workers or int(ray.cluster_resources().get("CPU", 1))
    count = max(1, min(count, batches))
    if memory is not None:
        _check_share(model, memory, count)
    log.info("%s: %d Ray tasks on %s", label, count, sharding.ray)
    graph = ray.put(_model_bytes(model))
    names = [v.name for v in values]
    task = ray.remote(max_retries=1)(_ray_shard)      # a crashed task is run again once
    shares = [_share(memory, i, count) for i in range(count)]
    refs = [task.remote(graph, names, ShardFeeds(list(DatasetShard(dataset, i, count).batches(batch, samples,
                                                                                              exact=exact)), i, count),
                        make_collector, samples, label, shares[i].max_bytes if shares[i] else None)
            for i in range(count)]
    results = []
    for i, ref in enumerate(refs):
        try:
            results.append(copy.deepcopy(ray.get(ref)))   # Ray's arrays are read-only views; merges add in place
        except ray.exceptions.RayTaskError as err:     # the task raised: that error here
            cause = getattr(err, "cause", None)
            if isinstance(cause, QCompileError):
                raise cause from None
            raise RuntimeError(f"in a Ray task ({label}, shard {i + 1} of {count}):\n{err}") from None
        except ray.exceptions.RayError as err:         # the task's worker or node died, twice
            raise WorkerDied(f"{label}: the Ray task for calibration shard {i + 1} of {count} failed twice "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                             hint="see `ray status` and the cluster's logs; --workers N runs the shards here") from None
    if len({len(r) for r in results}) > 1:
        raise RuntimeError(f"{label}: the Ray tasks returned different numbers of groups")
    cls = type(make_collector())
    for parts in zip(*results):
        yield cls.merge(list(parts))


def _ray_shard(graph: bytes, names: list[str], feeds: ShardFeeds, make_collector, samples: int, label: str,
               max_bytes: int | None) -> list[dict]:
    """In a Ray task: the graph from its bytes, one shard streamed, every group's partial."""
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(graph))
    values = ir.convenience.create_value_mapping(model.graph)
    with tempfile.TemporaryDirectory(prefix="qcompile-ray-") as tmp:
        memory = MemoryPlan(max_bytes, Path(tmp)) if max_bytes is not None else None
        return list(_local_groups(model, [values[n] for n in names], feeds, make_collector(), samples=samples,
                                  label=label, progress=False, memory=memory, batch_size=1))


def _model_bytes(model: ir.Model) -> bytes:
    """The graph as it is at this pass, every weight inline (weights derived lazily computed,
    external ones read): what a Ray task on any machine can load. Protobuf caps it at 2 GB."""
    proto = ir.serde.serialize_model(model)
    tensors = {v.name: v.const_value for v in model.graph.initializers.values() if v.const_value is not None}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            inline = ir.serde.serialize_tensor(ir.tensor(np.asarray(tensors[tensor.name].numpy()), name=tensor.name))
            tensor.CopyFrom(inline)
    try:
        return proto.SerializeToString()
    except ValueError:
        weights = sum(t.nbytes for t in tensors.values())
        raise UsageError(f"--ray ships the graph to its tasks in one protobuf message, which cannot exceed 2 GB; "
                         f"this model's weights are {weights / 1e9:.1f} GB",
                         hint="use --workers N on one machine (its workers share the graph in memory)") from None
