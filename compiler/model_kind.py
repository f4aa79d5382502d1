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
