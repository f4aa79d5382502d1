"""Streaming a model's intermediate tensors over the calibration data: one onnxruntime session
exposing exactly the tensors asked for, batch by batch, the next batch computed while the
caller works on this one — or, under a memory cap (`--max-memory`), the same stream block by
block (compiler/layerwise.py). Every pass that reads activations (calibrate, smooth_quant,
awq, gptq, equalize_outputs, kv_cache) streams them through here."""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir

from qcompile.layerwise import prefetched, stream_blockwise
from qcompile.memory_plan import MemoryPlan
from qcompile.model_io import fixed_batch_size
from qcompile.ort_session import session_for
from qcompile.progress import progress_bar


def stream_tensors(model: ir.Model, values: list[ir.Value], dataset, *, samples: int, label: str,
                   progress: bool, batch_size: int = 1, memory: MemoryPlan | None = None, block_ends: bool = False,
                   sequential: bool = False):
    """Yield ({tensor name: array}, batch samples) for `values` over up to `samples` samples of
    `dataset`: one onnxruntime session exposing them, the model's fixed batch size if it has one,
    a progress bar, and onnxruntime running batch i+1 (it releases the GIL) while the caller
    works on batch i. Under a memory plan the stream goes block by block: a batch then comes
    once per block that makes a requested tensor, each tensor's batches in order, and its
    samples are counted at its first yield (0 afterwards). `block_ends`, `sequential` (under a
    memory plan): an empty item ends each block; with `sequential` the blocks after it see what
    the caller rewrote in it (compiler/layerwise.py)."""
    batch, fixed = fixed_batch_size(model)
    if memory is not None:
        for _, arrays, n in stream_blockwise(model, values, dataset, memory=memory, samples=samples, label=label,
                                             progress=progress, batch_size=batch or batch_size, exact=fixed,
                                             block_ends=block_ends, sequential=sequential):
            yield arrays, n
        return
    session = session_for(model, extra_outputs=values, level="basic")
    names = [v.name for v in values]
    total = min(samples, dataset.num_samples)
    with progress_bar(label, total, enabled=progress) as advance:
        for feed, outputs in prefetched(session, names, dataset.batches(batch or batch_size, limit=samples,
                                                                         exact=fixed)):
            n = next(iter(feed.values())).shape[0]
            yield dict(zip(names, outputs)), n
            advance(n)


def streamed_samples(model: ir.Model, dataset, *, samples: int) -> int:
    """How many samples `stream_tensors` feeds: up to `samples`, and only whole batches for a
    model whose batch size is fixed."""
    batch, fixed = fixed_batch_size(model)
    total = min(samples, dataset.num_samples)
    return total - total % batch if fixed else total


def batch_rng(name: str, batch: int) -> np.random.Generator:
    """The seeded random stream for sampling one tensor's rows in one batch (its index in the
    whole stream): what is sampled depends neither on the order tensors arrive in (whole model
    or block by block) nor on which worker streams the batch (--workers)."""
    return np.random.default_rng([zlib.crc32(name.encode()), batch])


def tensor_groups(stream):
    """(arrays, finished) for each item of `stream_tensors`, then a last ({}, finished):
    `finished` are the tensors no later item carries — block by block under --max-memory, all
    at the end otherwise — so a caller can use and drop each group's statistics at once."""
    pending: set[str] = set()
    for arrays, _ in stream:
        finished = pending if pending and not pending & arrays.keys() else set()
        pending = (pending - finished) | arrays.keys()
        yield arrays, finished
    yield {}, pending
