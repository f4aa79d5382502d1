"""What kind of model a graph is, read from its inputs and outputs (never from node names).

Why: some decisions follow the model's kind rather than the recipe — a decoder keeps its
dynamic batch, sequence and past-length axes so the compiled graph still decodes, and
verification reports perplexity for a causal LM.
"""

from __future__ import annotations

import onnx_ir as ir

from .lm_metrics import is_causal_lm


def has_kv_cache(model: ir.Model) -> bool:
    """A past input (past*) and a present output (present*): a decoder step with a KV cache."""
    return any(v.name.startswith("past") for v in model.graph.inputs) and \
        any(v.name.startswith("present") for v in model.graph.outputs)


def is_decoder(model: ir.Model) -> bool:
    """A causal LM (input_ids in, rank-3 logits out) or a graph with a KV cache."""
    outputs = {v.name: tuple(v.shape) if v.shape is not None else () for v in model.graph.outputs}
    return has_kv_cache(model) or is_causal_lm([v.name for v in model.graph.inputs], outputs)


# ops that mark a transformer encoder block, fused or spelled out by an exporter
_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization"}


def model_family(model: ir.Model) -> str:
    """decoder | encoder | cnn | other, from the graph's I/O and op mix (never node names):
    a decoder as `is_decoder`; an encoder has attention (a fused op, or Softmax between
    MatMuls) and normalisation (a norm op, or ReduceMean spelled out); a CNN has more Convs
    than MatMul/Gemm layers."""
    if is_decoder(model):
        return "decoder"
    ops: dict[str, int] = {}
    for node in model.graph:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    attention = bool(_ATTENTION_OPS & ops.keys()) or (ops.get("Softmax", 0) and ops.get("MatMul", 0) >= 2)
    norm = bool(_NORM_OPS & ops.keys()) or ops.get("ReduceMean", 0) > 0
    if attention and norm:
        return "encoder"
    if ops.get("Conv", 0) + ops.get("ConvTranspose", 0) > ops.get("MatMul", 0) + ops.get("Gemm", 0):
        return "cnn"
    return "other"
