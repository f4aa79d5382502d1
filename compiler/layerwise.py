"""Layer-wise activation streaming: the calibration data pushed through a model one block at
a time (compiler/blocks.py), so peak memory is one block's weights plus the activations that
cross into the next block — not the model.

For each block, an onnxruntime session over only that block's nodes and weights runs every
calibration batch; the tensors a later block reads go to the activation cache
(compiler/activation_cache.py), the tensors a pass asked for are yielded, and the session is
released before the next block's is made. Tensors that no later block reads leave the cache.

The numbers are those of the whole-model stream: the same batches through the same nodes,
each block run on the tensors the previous block produced. A block boundary is a graph output
of one session and a graph input of the next, which onnxruntime's optimizer cannot fuse
across: on the float32 models of tests/test_layerwise.py the tensors come out bit for bit
equal; a float16 model's crossing tensors are stored in float16 where one session may have
kept them in float32 (its CPU kernels compute some half ops in float32), a last-bit change.
"""

from __future__ import annotations

import concurrent.futures
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from .activation_cache import ActivationCache
from .blocks import Block, BlockPartition, node_reads, partition_blocks
from .errors import ModelError
from .memory_plan import MemoryPlan
from .model_io import infer_shapes, ir_version_for, opset_of
from .ort_session import session_options
from .pass_context import log
from .progress import progress_bar


def float32_bytes(value: ir.Value) -> int:
    """What an initializer weighs once in a session: float16/bfloat16 weights are widened."""
    tensor = value.const_value
    if tensor is None:
        return 0
    if tensor.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return 2 * int(tensor.nbytes)
    return int(tensor.nbytes)


def partition_for(model: ir.Model, memory: MemoryPlan) -> BlockPartition:
    return partition_blocks(model, memory.block_bytes, weight_bytes_of=float32_bytes)


def stream_blockwise(model: ir.Model, values: list[ir.Value], dataset, *, memory: MemoryPlan, samples: int,
                     label: str, progress: bool, batch_size: int, exact: bool, level: str = "basic",
                     block_ends: bool = False, sequential: bool = False
                     ) -> Iterator[tuple[int, dict[str, np.ndarray], int]]:
    """Yield (batch index, {tensor name: array}, samples) block by block, batch by batch, for
    `values`. A batch's samples are counted once (at its first yield); later yields of it give 0.
    `level`: onnxruntime's graph optimizations in the block sessions (verification runs the
    outputs at "all", as deployed).

    `block_ends`: after a block's tensors an empty item (-1, {}, 0) marks the block's end, its
    session already dropped, so a caller finishing that block's statistics (GPTQ rounding it)
    does not hold the next block's session meanwhile; such a caller must not rewrite what the
    stream has still to run. Without it a group finishes when the next block's first batch
    arrives, its session made (SmoothQuant folds its scales then: the blocks still to run are
    already built). `sequential` (implies `block_ends`): when the caller asks for more, the
    block runs again with its weights as the caller left them (GPTQ's rounded ones) to make the
    tensors later blocks read — so every block sees the blocks before it as rewritten."""
    partition = partition_for(model, memory)
    blocks = partition.blocks
    _type_crossings(model, blocks)
    wanted = {v.name for v in values}
    graph_inputs = {v.name for v in model.graph.inputs}
    last = max((b.index for b in blocks if wanted & b.produced()), default=-1)
    needed_blocks = blocks[:last + 1]
    log.info("%s: layer-wise over %d of %d blocks (largest %.1f MiB of weights)", label, len(needed_blocks),
             len(blocks), partition.largest_block_bytes / 2**20)
    needed_after = _needed_after(needed_blocks)
    folder = main_data_folder(model)
    cache = ActivationCache(memory.cache_bytes, memory.scratch / f"activations-{label}")
    total = min(samples, dataset.num_samples)
    counted: set[int] = set()
    try:
        with progress_bar(f"{label} (layer-wise)", total * max(len(needed_blocks), 1), enabled=progress) as advance:
            inputs_wanted = sorted(wanted & graph_inputs)
            if inputs_wanted:   # graph inputs asked for come straight from the data
                for i, feed in enumerate(dataset.batches(batch_size, limit=samples, exact=exact)):
                    counted.add(i)
                    yield i, {k: feed[k] for k in inputs_wanted}, _samples_in(feed)
            for block in needed_blocks:
                keep = [n for n in block.outputs if n in needed_after[block.index]]
                yielded = [n for n in sorted(block.produced()) if n in wanted]
                fetch = list(dict.fromkeys(keep + yielded))
                if not fetch:
                    advance(total)
                    continue
                rerun = sequential and bool(yielded) and bool(keep)
                # (outputs, cache them, yield them): one run, or under `sequential` the yielded
                # tensors first and, once the caller has rewritten the block, the cached ones
                runs = [(yielded, False, True), (keep, True, False)] if rerun else [(fetch, True, bool(yielded))]
                for run, (names, caches, yields) in enumerate(runs):
                    session = block_session(model, block, names, folder, level=level)
                    feeds = _block_feeds(block, dataset, cache, samples=samples, batch_size=batch_size, exact=exact)
                    for i, (feed, outputs) in enumerate(prefetched(session, names, feeds)):
                        result = dict(zip(names, outputs))
                        for name in keep if caches else ():
                            cache.put(i, name, result[name])
                        n = _samples_in(feed)
                        if yields:
                            yield i, {name: result[name] for name in yielded}, (0 if i in counted else n)
                            counted.add(i)
                        if run == 0:
                            advance(n)
                    del session
                    if yields and (block_ends or sequential):   # the block's end, before any other session
                        yield -1, {}, 0
                cache.keep_only(needed_after[block.index])
    finally:
        cache.clear()


def _type_crossings(model: ir.Model, blocks: tuple[Block, ...]) -> None:
    """A block's inputs are graph inputs of its session: they need a type. Infer the graph's
    shapes once if one has none; a tensor inference cannot type ends the compile, named."""
    values = ir.convenience.create_value_mapping(model.graph, include_subgraphs=False)
    crossing = {name for b in blocks for name in b.inputs}
    if all(values[n].type is not None for n in crossing):
        return
    infer_shapes(model)
    untyped = sorted(n for n in crossing if values[n].type is None)
    if untyped:
        raise ModelError(f"the layer-wise compile cuts the graph at {untyped[0]!r}, whose type shape inference "
                         "cannot tell", hint="run without --max-memory, or export the model with value_info")


def _samples_in(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0] if feed else 0


def _needed_after(blocks: tuple[Block, ...]) -> dict[int, set[str]]:
    """{block index: the crossing tensors a later block reads}: what must stay cached once it ran."""
    needed: dict[int, set[str]] = {}
    running: set[str] = set()
    for block in reversed(blocks):
        needed[block.index] = set(running)
        running |= set(block.inputs)
    return needed


def _block_feeds(block: Block, dataset, cache: ActivationCache, *, samples: int, batch_size: int, exact: bool):
    for i, feed in enumerate(dataset.batches(batch_size, limit=samples, exact=exact)):
        inputs = {name: feed[name] for name in block.graph_inputs}
        inputs.update({name: np.asarray(cache.get(i, name)) for name in block.inputs})
        yield inputs


def prefetched(session, names, feeds):
    """Yield (feed, outputs), computing the next batch's outputs in a worker thread (onnxruntime
    releases the GIL): at most two batches of activations are alive at once."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed in feeds:
            future = pool.submit(session.run, names, feed)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (feed, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def block_model(model: ir.Model, block: Block, outputs: list[str], folder: str | None) -> onnx.ModelProto:
    """The block as a standalone ModelProto with `outputs` as its graph outputs. Weights in
    `folder` (main_data_folder: the model's own data file) stay there for onnxruntime to read;
    every other weight (rewritten, widened, spilled elsewhere) is written into the proto — one
    block's worth."""
    graph = model.graph
    reads = [v for node in block.nodes for v in node_reads(node)]
    values: dict[str, ir.Value] = {}
    for v in reads:
        values.setdefault(v.name, v)
    registered = set(graph.initializers.values())   # by value: a renamed initializer keeps its old key
    initializers = list({v: None for v in reads if v in registered and v.const_value is not None})
    out = onnx.ModelProto()
    proto = out.graph          # filled in place: make_model would copy the block's weights once more
    proto.name = f"block_{block.index}"
    proto.node.extend(ir.serde.serialize_node(node) for node in block.nodes)
    for name in (*block.graph_inputs, *block.inputs):
        proto.input.append(ir.serde.serialize_value(values[name]))
    for name in outputs:
        proto.output.append(onnx.ValueInfoProto(name=name))   # typed by onnxruntime's inference
    for v in initializers:
        tensor = v.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            serialized = ir.serde.serialize_tensor(tensor)        # in memory, or computed lazily
        elif str(tensor.base_dir) == str(folder):
            serialized = ir.serde.serialize_tensor(tensor)        # stays an external reference
        else:                                                     # spilled elsewhere: inline, one block's worth
            serialized = ir.serde.serialize_tensor(ir.tensor(tensor.numpy()))
        serialized.name = v.name   # the value's name: a tensor may keep the one it was made under
        proto.initializer.append(serialized)
    out.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items())
    out.producer_name = "qcompile-layerwise"
    out.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    out.ir_version = ir_version_for(opset_of(model))
    return out


def optimized_blocks(model: ir.Model, memory: MemoryPlan) -> Iterator[onnx.GraphProto]:
    """Each block's graph as onnxruntime's optimizer leaves it (all levels), one block in memory
    at a time (cpu_lower reads which int8 kernels its layers got)."""
    folder = main_data_folder(model)
    for block in partition_for(model, memory).blocks:
        if not block.outputs:
            continue
        with tempfile.TemporaryDirectory(dir=memory.scratch if memory.scratch.exists() else None) as tmp:
            path = Path(tmp) / "optimized.onnx"
            block_session(model, block, list(block.outputs), folder, level="all", optimized_path=str(path))
            yield onnx.load(str(path), load_external_data=False).graph


def block_session(model: ir.Model, block: Block, outputs: list[str], folder: str | None, *, level: str = "basic",
                  optimized_path: str | None = None) -> ort.InferenceSession:
    proto = block_model(model, block, outputs, folder)
    opts = session_options(level=level, optimized_path=optimized_path, threads=1 if optimized_path else 0)
    # no arena: an output array kept after the session is gone (the cache, a pass's sample)
    # would otherwise keep the session's whole arena alive with it
    opts.enable_cpu_mem_arena = False
    if folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    data = proto.SerializeToString()
    del proto
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def main_data_folder(model: ir.Model) -> str | None:
    """The folder of the input model's external data (where most untouched weights still are)."""
    counts: dict[str, int] = {}
    for v in model.graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            counts[str(v.const_value.base_dir)] = counts.get(str(v.const_value.base_dir), 0) + v.const_value.nbytes
    return max(counts, key=counts.get) if counts else None
