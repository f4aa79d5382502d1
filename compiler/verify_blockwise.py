"""Verification under `--max-memory`: the same numbers as compiler/verify.py's
`verify_models`, with neither model ever whole in memory.

The original runs block by block (compiler/layerwise.py) over the verification batches; its
graph outputs and the quantized layers' tensors go to an activation cache (memory, then disk).
Then the compiled model runs block by block over the same batches, and each tensor it makes
is compared with the cached reference as it comes: per-output SQNR/cosine, the causal-LM
task metrics, the per-layer table. Each tensor sees its batches in the same order as in the
whole-model verification, so the sums are the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from .activation_cache import ActivationCache
from .analyses import Rescales
from .layerwise import stream_blockwise
from .lm_metrics import IDS, LOGITS, MASK, TokenStats, is_causal_lm
from .memory_plan import MemoryPlan
from .model_io import fixed_batch_size, infer_shapes
from .verify import ErrorStats, _decode, _encode, io_quantization, layer_table


class _Encoded:
    """The verification data as the compiled model takes it (an int8 KV cache's inputs encoded)."""

    def __init__(self, dataset, codecs: dict):
        self.dataset, self.codecs = dataset, codecs
        self.num_samples = dataset.num_samples

    def batches(self, batch_size: int, limit=None, *, exact: bool = False):
        for feed in self.dataset.batches(batch_size, limit, exact=exact):
            yield _encode(feed, self.codecs)


def verify_blockwise(original: Path, compiled: Path, dataset, *, memory: MemoryPlan, samples: int = 64,
                     layers: dict[str, dict] | None = None, layer_samples: int = 4,
                     rescales: Rescales | None = None, progress: bool = True) -> dict:
    rescales = rescales or Rescales()
    ref_model, got_model = ir.load(original), ir.load(compiled)
    for model in (ref_model, got_model):   # a block's inputs need their types
        infer_shapes(model)
    codecs = io_quantization(compiled)
    out_names = [v.name for v in ref_model.graph.outputs]
    got_outputs = {v.name for v in got_model.graph.outputs}
    missing = [n for n in out_names if n not in got_outputs]
    if missing:
        raise ValueError(f"compiled model lacks outputs {missing}")
    ref_values, got_values = (ir.convenience.create_value_mapping(m.graph, include_subgraphs=False)
                              for m in (ref_model, got_model))
    layer_tensors = sorted({t for spec in (layers or {}).values() for t in (spec.get("input"), spec["output"])
                            if t in ref_values and t in got_values})
    shapes = {v.name: tuple(v.shape) if v.shape is not None else () for v in ref_model.graph.outputs}
    lm = TokenStats() if is_causal_lm([v.name for v in ref_model.graph.inputs], shapes) else None
    batch = fixed_batch_size(got_model)[0] or 1
    exact = batch > 1
    total = min(samples, dataset.num_samples)
    if exact:
        total -= total % batch
    layer_batches = -(-max(layer_samples, batch) // batch)   # the batches the per-layer table reads
    feeds = {i: (feed[IDS], feed.get(MASK)) for i, feed in enumerate(dataset.batches(batch, limit=total, exact=exact))} \
        if lm is not None else {}
    accs = {n: ErrorStats() for n in out_names}

    def outputs(i, name, ref, got):
        got = _decode(name, got, codecs)
        accs[name].update(ref, got)
        if name == LOGITS and lm is not None:
            lm.update(*feeds[i], ref, got)

    layer_accs = {t: ErrorStats() for t in layer_tensors}

    def layer_tensor(i, name, ref, got):
        layer_accs[name].update(ref, rescales.undo(name, got))

    # as verify_models: the outputs through sessions optimized as deployed (the int8 kernels),
    # the layers' tensors through sessions that expose them (basic optimizations)
    common = dict(memory=memory, codecs=codecs, batch=batch, exact=exact, progress=progress)

    def tensors(names):
        return ref_model, [ref_values[n] for n in names], got_model, [got_values[n] for n in names]

    _compare(*tensors(out_names), dataset, total, "all", outputs, **common)
    if layer_tensors:
        _compare(*tensors(layer_tensors), dataset, layer_batches * batch, "basic", layer_tensor, **common)
    result = {"samples": total, "data": dataset.description,
              "outputs": {n: a.summary() for n, a in accs.items()}, "layer_wise": True}
    if lm is not None:
        result["task"] = lm.summary()
    if layers:
        result["layers"] = layer_table(layers, layer_accs)
    return result


def _compare(ref_model: ir.Model, ref_tensors: list[ir.Value], got_model: ir.Model, got_tensors: list[ir.Value],
             dataset, samples: int, level: str, update, *, memory: MemoryPlan, codecs: dict, batch: int, exact: bool,
             progress: bool) -> None:
    """Run the original block by block over `samples`, caching the tensors; then the compiled model,
    calling update(batch index, name, reference, compiled) as each tensor comes — in batch order
    for each tensor (one block makes it), so every sum adds up as in the whole-model verification."""
    reference = ActivationCache(memory.cache_bytes, memory.scratch / "verify-reference")
    try:
        for i, arrays, _ in stream_blockwise(ref_model, ref_tensors, dataset, memory=memory,
                                             samples=samples, label="verify: original", progress=progress,
                                             batch_size=batch, exact=exact, level=level):
            for name, array in arrays.items():
                reference.put(i, name, array)
        for i, arrays, _ in stream_blockwise(got_model, got_tensors, _Encoded(dataset, codecs),
                                             memory=memory, samples=samples, label="verify: compiled",
                                             progress=progress, batch_size=batch, exact=exact, level=level):
            for name, got in arrays.items():
                update(i, name, np.asarray(reference.get(i, name)), got)
    finally:
        reference.clear()

