"""The fusion rule sets the `fuse` pass applies, in the order it applies them, as data.

Each step is one of onnxscript's rewrite-rule sets (`onnxscript.rewriter.ort_fusions` and
`onnxscript.rewriter.rules.fusion`), except the two rotary-cache steps of our own
(passes/rules/rotary_cache.py) for cos/sin spellings onnxscript's `cos_sin_cache` misses.
This module holds the order, the grouping a recipe selects (`fuse.rules`), and the
operators each group leaves in the graph, which a target must run (`fusions` in its
descriptor).

The order is onnxscript's `fuse_xformers` order (its intermediate SDPA must exist before
MultiHeadAttention/GroupQueryAttention can absorb it; Gelu must be fused before BiasGelu),
with LayerNorm first: `fuse_xformers` does not wire that rule in, and TorchScript exports
of older opsets spell LayerNorm out.
"""

from __future__ import annotations

import dataclasses

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import (attention, bias_gelu, cos_sin_cache, erfgelu, gelu, gqa, mha, mha_bias,
                                             mha_scale, rms_normalization, rotary_embedding, sdpa, sdpa_via_mha,
                                             skip_normalization)
from onnxscript.rewriter.rules.fusion import _layer_norm

from qcompile.passes.rules import rotary_cache


@dataclasses.dataclass(frozen=True)
class Step:
    group: str                      # the recipe's name for it (fuse.rules)
    name: str                       # the report's name for it
    rules: pattern.RewriteRuleSet
    infer_shapes_after: bool = False  # later rules of the group check shapes of the new nodes


STEPS: tuple[Step, ...] = (
    Step("layer_norm", "layer_norm", _layer_norm.layer_normalization_ruleset),
    Step("gelu", "erf_gelu", erfgelu.rules),
    Step("rms_norm", "rms_norm", rms_normalization.rms_normalization_ruleset),
    Step("skip_norm", "skip_layer_norm", skip_normalization.skip_layer_normalization_ruleset),
    Step("skip_norm", "skip_rms_norm", skip_normalization.skip_rms_normalization_ruleset),
    Step("rotary", "rotary_embedding", rotary_embedding.rotary_embedding_rules),
    Step("rotary", "cos_sin_cache", cos_sin_cache.cos_sin_cache_rules),
    Step("rotary", "gathered_cos_sin", rotary_cache.gathered_cos_sin_rules),
    Step("rotary", "outer_product_cos_sin", rotary_cache.outer_product_cos_sin_rules),
    Step("rotary", "partial_rotary_embedding", rotary_embedding.partial_embedding_rules),
    Step("attention", "sdpa", sdpa.sdpa_rules, infer_shapes_after=True),
    # opt-in: GroupQueryAttention derives each row's length from attention_mask (seqlens_k)
    # and leaves right-padded query positions uncomputed, so those positions differ from the
    # original graph; MultiHeadAttention (+ RotaryEmbedding) is exact everywhere
    Step("attention_gqa", "gqa", gqa.gqa_rules),
    Step("attention", "mha_past", mha.mha_rules_with_past),
    Step("attention", "mha", mha.mha_rules_no_past),
    Step("attention", "mha_scale", mha_scale._mha_scale_rules),
    # packed: Q/K/V biases into MultiHeadAttention, then the three projections into one
    # com.microsoft Attention with a packed weight (the projections stop being MatMuls a
    # later quantize can see)
    Step("attention_packed", "mha_bias", mha_bias.mha_bias_rules),
    Step("attention_packed", "packed_attention", attention.attention_rules),
    Step("gelu", "gelu", gelu.gelu_rules),
    Step("gelu", "bias_gelu", bias_gelu.bias_gelu_rules),
    # an SDPA no MHA/GQA rule took: written as MultiHeadAttention
    Step("attention", "sdpa_via_mha", sdpa_via_mha._rules),
)

# the operators each group leaves in the graph (a target's `fusions` list names the groups it runs)
PRODUCES: dict[str, tuple[str, ...]] = {
    "layer_norm": ("LayerNormalization",),
    "gelu": ("com.microsoft::Gelu", "com.microsoft::FastGelu", "com.microsoft::BiasGelu"),
    "rms_norm": ("com.microsoft::SimplifiedLayerNormalization",),
    "skip_norm": ("com.microsoft::SkipLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization"),
    "rotary": ("com.microsoft::RotaryEmbedding",),
    "attention": ("com.microsoft::MultiHeadAttention",),
    "attention_gqa": ("com.microsoft::GroupQueryAttention",),
    "attention_packed": ("com.microsoft::Attention",),
}
GROUPS: tuple[str, ...] = tuple(PRODUCES)
DEFAULT_GROUPS: tuple[str, ...] = ("layer_norm", "gelu", "rms_norm", "skip_norm", "rotary", "attention")

# the fused attention operators (FA3 quantizes their Q/K/V inputs)
ATTENTION_OPS: dict[str, tuple[int, int, int]] = {  # op -> input index of query, key, value
    "MultiHeadAttention": (0, 1, 2),
    "GroupQueryAttention": (0, 1, 2),
}
