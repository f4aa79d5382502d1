"""Streaming a model's intermediate tensors over the calibration data: one onnxruntime session
exposing exactly the tensors asked for, batch by batch, the next batch computed while the
caller works on this one. Every pass that reads activations (calibrate, smooth_quant, awq,
gptq, equalize_outputs, kv_cache) streams them through here."""

from __future__ import annotations

import concurrent.futures

import onnx_ir as ir

from qcompile.ort_session import session_for
from qcompile.progress import progress_bar


def stream_tensors(model: ir.Model, values: list[ir.Value], dataset, *, samples: int, label: str,
                   progress: bool, batch_size: int = 1):
    """Yield ({tensor name: array}, batch samples) for `values` over up to `samples` samples of
    `dataset`: one onnxruntime session exposing them, the model's fixed batch size if it has one,
    a progress bar, and onnxruntime running batch i+1 (it releases the GIL) while the caller
    works on batch i. Every pass that reads activations (calibrate, smooth_quant, gptq, awq)
    streams them through here."""
    session = session_for(model, extra_outputs=values, level="basic")
    names = [v.name for v in values]
    batch, fixed = fixed_batch_size(model)
    total = min(samples, dataset.num_samples)
    with progress_bar(label, total, enabled=progress) as advance:
        for feed, outputs in _prefetched(session, names, dataset.batches(batch or batch_size, limit=samples,
                                                                          exact=fixed)):
            n = next(iter(feed.values())).shape[0]
            yield dict(zip(names, outputs)), n
            advance(n)


def _prefetched(session, names, feeds):
    """Yield (feed, outputs), computing the next batch's outputs in a worker thread.

    At most two batches of activations are alive at once, so memory stays flat.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed in feeds:
            future = pool.submit(session.run, names, feed)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (feed, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def fixed_batch_size(model: ir.Model) -> tuple[int | None, bool]:
    """(the model's fixed batch size, True) if axis 0 of its inputs is pinned, else (None, False)."""
    sizes = {v.shape[0] for v in model.graph.inputs
             if v.shape is not None and len(v.shape) > 0 and v.name not in model.graph.initializers}
    fixed = [s for s in sizes if isinstance(s, int) and s > 0]
    return (fixed[0], True) if fixed else (None, False)
