"""Partitioning a graph into a chain of blocks, from its structure alone, for the layer-wise
compile (compiler/layerwise.py): each block is a run of consecutive nodes whose weights fit a
byte cap, cut where the fewest intermediate tensors cross from one block to the next.

A decoder's layers meet at the residual stream: between two layers only the hidden state and
the few tensors every layer reads (mask, rotary tables) are alive, so the cheapest cuts are
the layer boundaries. No node or tensor name is read: the cut is found from the tensors'
lifetimes in the graph's (topological) node order.

A block's inputs are the tensors it reads that an earlier block made (the graph's own inputs
are fed from the data); its outputs are the tensors it makes that a later block reads, plus
the graph outputs it makes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from .errors import UsageError
from .memory_plan import memory_needed


@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    nodes: tuple[ir.Node, ...]
    inputs: tuple[str, ...]          # made by an earlier block
    graph_inputs: tuple[str, ...]    # the model's inputs this block reads
    outputs: tuple[str, ...]         # read by a later block, or a graph output
    weight_bytes: int                # the initializers its nodes read

    def produced(self) -> set[str]:
        return {v.name for node in self.nodes for v in node.outputs if v is not None}


@dataclasses.dataclass(frozen=True)
class BlockPartition:
    """The chain of blocks, and what one needs at most (the cap a memory plan must allow)."""
    blocks: tuple[Block, ...]
    cap_bytes: int

    @property
    def largest_block_bytes(self) -> int:
        return max(b.weight_bytes for b in self.blocks)

    def describe(self) -> dict:
        return {"blocks": len(self.blocks), "cap_bytes": self.cap_bytes,
                "largest_block_bytes": self.largest_block_bytes,
                "crossing_tensors_max": max(len(b.inputs) for b in self.blocks)}


def node_reads(node: ir.Node) -> list[ir.Value]:
    """What `node` reads: its inputs and, for If/Loop/Scan, what its subgraphs capture from outside."""
    reads = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for graph in graphs:
            inside = {v for n in ir.traversal.RecursiveGraphIterator(graph) for v in n.outputs}
            inside.update(graph.inputs)
            inside.update(graph.initializers.values())
            reads += [v for n in ir.traversal.RecursiveGraphIterator(graph) for v in n.inputs
                      if v is not None and v not in inside]
    return reads


def partition_blocks(model: ir.Model, cap_bytes: int, *, weight_bytes_of=None) -> BlockPartition:
    """Cut the graph into blocks of at most `cap_bytes` of weights each: from each block's
    first node, the cut goes where the fewest tensors cross among the positions that fill the
    block to between half the cap and the cap (the furthest of equals).
    `weight_bytes_of(value)` sizes an initializer (default: its bytes as stored).

    Raises UsageError when one node alone reads more than `cap_bytes` of weights."""
    graph = model.graph
    initializers = set(graph.initializers.values())
    graph_inputs = set(graph.inputs)
    outputs = set(graph.outputs)
    nodes = _near_use(list(graph))
    if not nodes:
        raise UsageError("the graph has no nodes to partition")
    size = weight_bytes_of or _stored_bytes
    index = {node: i for i, node in enumerate(nodes)}

    # each node's reads, and the weight it brings: every initializer it reads (an initializer
    # two blocks read — tied embeddings — is in both blocks' sessions)
    reads = [node_reads(node) for node in nodes]
    weight = np.array([sum(size(v) for v in set(values) if v in initializers) for values in reads], dtype=np.int64)
    heaviest = int(weight.max())
    if heaviest > cap_bytes:
        node = nodes[int(weight.argmax())]
        raise UsageError(f"one node ({node.name or node.op_type}) reads {_size(heaviest)} of weights, more "
                         f"than the {_size(cap_bytes)} a block may hold under this memory cap",
                         hint=f"raise --max-memory so that one block fits (at least {_need_gib(heaviest):.1f} GB)")

    # lifetimes: value made at node p and last read at node q crosses the cuts p+1..q
    last_read: dict[ir.Value, int] = {}
    for i, values in enumerate(reads):
        for v in values:
            if v not in initializers and v not in graph_inputs:
                last_read[v] = max(last_read.get(v, -1), i)
    crossing = np.zeros(len(nodes) + 1, dtype=np.int64)   # crossing[c]: tensors alive across cut c
    for v, q in last_read.items():
        p = index.get(v.producer())
        if p is not None and q > p:
            crossing[p + 1] += 1
            crossing[q + 1] -= 1
    crossing = np.cumsum(crossing)

    cuts = [0]
    cumulative = np.concatenate([[0], np.cumsum(weight)])
    while cuts[-1] < len(nodes):
        start = cuts[-1]
        # the furthest end whose block still fits the cap
        end = int(np.searchsorted(cumulative, cumulative[start] + cap_bytes, side="right")) - 1
        if end >= len(nodes):
            cuts.append(len(nodes))
            break
        # the cut: the fewest crossing tensors (the furthest of equals) among the positions that
        # give the block at least half the cap, so no block is a sliver before a cheap cut
        first = int(np.searchsorted(cumulative, cumulative[start] + cap_bytes / 2, side="left"))
        first = min(max(first, start + 1), end)
        window = crossing[first:end + 1]
        cuts.append(first + (len(window) - 1 - int(np.argmin(window[::-1]))))

    blocks = []
    for b, (s, e) in enumerate(zip(cuts, cuts[1:])):
        members = nodes[s:e]
        made = {v for node in members for v in node.outputs if v is not None}
        read_here = [v for values in reads[s:e] for v in values]
        ins = _unique(v.name for v in read_here if v not in made and v not in initializers and v not in graph_inputs)
        g_ins = _unique(v.name for v in read_here if v in graph_inputs)
        outs = _unique(v.name for v in (out for node in members for out in node.outputs)
                       if v is not None and (v in outputs or last_read.get(v, -1) >= e))
        held = sum(size(v) for v in {v for v in read_here if v in initializers})
        blocks.append(Block(b, tuple(members), ins, g_ins, outs, held))
    return BlockPartition(tuple(blocks), cap_bytes)


def _near_use(nodes: list[ir.Node]) -> list[ir.Node]:
    """The nodes in an order that keeps each with its layer: every node as late as its readers
    allow (right before its first reader: a weight's DequantizeLinear, the Cast of a past-KV
    input, the mask built from attention_mask), and a node nothing reads (the Cast of a
    `present` output back to float16) right after its last input. A topological sort may put
    such nodes anywhere — all of a float16 decoder's output Casts last, say — and every tensor
    they read would then cross every cut up to there. Still a topological order."""
    position = {node: float(i) for i, node in enumerate(nodes)}

    def readers(node):
        return [use.node for out in node.outputs if out is not None for use in out.uses()]

    sinks = [n for n in nodes if not readers(n)]
    sink_set = set(sinks)
    key: dict[ir.Node, float] = {}
    for node in reversed(nodes):
        if node in sink_set:
            continue
        found = readers(node)
        if any(r not in position for r in found):      # read inside a subgraph: leave it where it is
            key[node] = position[node]
            continue
        later = [key[r] for r in found if r not in sink_set]
        key[node] = min(later) - 1e-6 if later else position[node]
    for node in sinks:
        inputs = [key[v.producer()] for v in node_reads(node) if v.producer() in key]
        key[node] = max(inputs) + 1e-6 if inputs else position[node]
    return sorted(nodes, key=key.__getitem__)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _stored_bytes(value: ir.Value) -> int:
    tensor = value.const_value
    return int(tensor.nbytes) if tensor is not None else 0


def _need_gib(block_bytes: int) -> float:
    return memory_needed(block_bytes) / 1e9
