"""Let fusion patterns see through activation Q→DQ pairs.

A graph that was quantized before it was fused carries `x → QuantizeLinear → DequantizeLinear
→ consumer` on activations, and no onnxscript pattern expects those nodes between the ops
it matches. `lift` takes each such pair out (its consumers read `x` directly) and remembers
it; after fusion, `restore` puts every pair back in front of the consumers that still read
`x` — the original ones, or a fused node that replaced one of them — and reports the pairs
whose tensor disappeared inside a fused operator (that quantization is gone: the fused
kernel computes in float there). Weight DequantizeLinear nodes (constant input) stay put.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir


@dataclasses.dataclass
class LiftedPair:
    x: ir.Value
    quantize: ir.Node
    dequantize: ir.Node
    consumers: list[tuple[ir.Node, int]]   # read x through this pair
    plain: list[ir.Node]                     # read x directly (no Q/DQ)


def lift(graph: ir.Graph) -> list[LiftedPair]:
    """Take the activation Q→DQ pairs out of `graph`; their consumers read the float tensor."""
    outputs = set(graph.outputs)
    lifted = []
    for q in list(graph):
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        x = q.inputs[0]
        if x is None or x.const_value is not None:
            continue
        dqs = [u.node for u in q.outputs[0].uses()]
        if not dqs or any(d.op_type != "DequantizeLinear" or d.outputs[0] in outputs for d in dqs) \
                or q.outputs[0] in outputs:
            continue
        plain = [u.node for u in x.uses() if u.node.op_type != "QuantizeLinear"]
        for dq in dqs:
            consumers = [(u.node, u.idx) for u in dq.outputs[0].uses()]
            for node, index in consumers:
                node.replace_input_with(index, x)
            lifted.append(LiftedPair(x, q, dq, consumers, plain))
        graph.remove([*dqs, q], safe=False)
        q.replace_input_with(0, None)  # a detached reader would block the rules' "no other uses" check
    return lifted


def restore(graph: ir.Graph, lifted: list[LiftedPair], nodes_before: set[int]) -> list[str]:
    """Put the pairs back; returns the names of the tensors whose pair had no consumer left.

    A consumer still in the graph gets the pair on whatever it reads now at that input: a
    fusion that rebuilt the producer (LayerNorm -> SkipLayerNormalization) hands the
    consumer a new value, which is the same tensor."""
    alive = {id(n) for n in graph}
    dropped, placed = [], set()
    for pair in lifted:
        uses = [(n, i) for n, i in pair.consumers if id(n) in alive and n.inputs[i] is not None]
        # a fused node (new since lift) that now reads x took over a quantized consumer, when
        # only quantized consumers disappeared (else it may stand for a float reader too)
        gone_quantized = any(id(n) not in alive for n, _ in pair.consumers)
        gone_plain = any(id(n) not in alive for n in pair.plain)
        if gone_quantized and not gone_plain:
            uses += [(u.node, u.idx) for u in pair.x.uses()
                     if id(u.node) not in nodes_before and id(u.node) in alive
                     and u.node.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        if not uses:
            dropped.append(pair.x.name)
            continue
        source = uses[0][0].inputs[uses[0][1]]
        if id(pair.quantize) not in placed:
            pair.quantize.replace_input_with(0, source)
            graph.append(pair.quantize)
            placed.add(id(pair.quantize))
        graph.append(pair.dequantize)
        for node, index in uses:
            if node.inputs[index] is source:
                node.replace_input_with(index, pair.dequantize.outputs[0])
    graph.sort()
    return sorted(set(dropped))
