"""The quantize pass's options, and which scheme each layer gets from them."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

from qcompile.schemes import ActivationScheme, Scheme, WeightScheme, builtin_scheme, mixable_schemes, \
    scheme_compatibility


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Automatic fallback: the `max_layers` layers ranked worst stay float. `range`: by the
    range measure max|x|/std of the layer's input (calibration histograms, in this pass);
    `error`: by the noise each layer adds when quantized (a first compile is verified, then
    the model is compiled again without them: compiler/fallback.py)."""
    max_layers: int = 0
    rank_by: Literal["error", "range"] = "error"

    def validate(self):
        if self.max_layers < 0:
            return "max_layers", f"must be at least 0, got {self.max_layers}"
        return None


@dataclasses.dataclass(frozen=True)
class RangeGuard:
    """Range-aware placement: a static activation that joins quantities of very different
    scales cannot share one per-tensor scale. The layer reading it stays float when the
    tensor is a Concat whose inputs' ranges differ more than `concat_ratio` times (a detector
    head joining pixel boxes with [0, 1] scores), or when it holds values beyond `max_abs` or
    Inf/NaN (an attention mask of -3.4e38). 0 turns a check off."""
    concat_ratio: float = 64.0
    max_abs: float = 1e6

    def validate(self):
        if self.concat_ratio < 0 or self.max_abs < 0:
            return "concat_ratio", "must be >= 0 (0 turns the check off)"
        return None


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    op_types: tuple[Literal["Conv", "MatMul", "Gemm"], ...] = ("Conv", "MatMul", "Gemm")
    weight: WeightScheme = WeightScheme()
    activation: ActivationScheme | None = ActivationScheme()
    # per-scope schemes, first matching glob wins: {"*attention*": w8a16, "*head*": float}
    mix: dict[str, str] = dataclasses.field(default_factory=dict)
    # the scheme (a built-in scheme name, or float) of the layers whose output is a model output
    # (an LM's logits projection, a classifier head), found from the graph; None: the recipe's.
    # llama.cpp and onnxruntime-genai keep a decoder's output projection at 8 bits for int4
    # models too; `mix` globs still win over it
    output_layers: str | None = None
    fold_activations: bool = True
    # a Conv feeding a graph output gets Q/DQ on it too: onnxruntime fuses QLinearConv only then
    quantize_graph_outputs: bool = True
    # which static layers get Q/DQ on their output: `conv` (onnxruntime's QLinearConv needs it;
    # MatMul/Gemm fuse to MatMulIntegerToFloat/QGemm with a float output, and an output that
    # feeds a residual Add or LayerNorm keeps its outlier channels unclipped) or `all`
    output_quantization: Literal["conv", "all"] = "conv"
    # keep layers float where the target says int8 is slower (its `int8_min_macs`)
    speed_fallback: bool = True
    # elementwise operators between quantized tensors run on int8 too, where the target has
    # kernels for them (its `int8_elementwise`) and the region closes (passes/quantize/regions.py)
    int8_regions: bool = True
    # on a target whose int8 is symmetric only and that asks for it (its
    # `shift_one_sided_activations`: cuda), a one-sided tensor read only by MatMuls is quantized
    # as if with a zero point, through a shift (passes/quantize/shifts.py); false: never
    shift_one_sided: bool = True
    fallback: Fallback = Fallback()
    range_guard: RangeGuard = RangeGuard()
    # subtract each layer's weight-quantization mean shift ΔW·E[x] from its bias (DFQ's bias
    # correction; E[x] per input channel from calibration)
    bias_correction: bool = False

    def validate(self) -> tuple[str, str] | None:
        problem = scheme_compatibility(self.weight, self.activation)
        if problem:
            return problem
        for glob, name in self.mix.items():
            try:
                builtin_scheme(name)
            except KeyError:
                return f"mix.{glob}", (f"unknown scheme {name!r}; a mix maps a layer-name glob to one of: "
                                       f"{', '.join(mixable_schemes())}")
        if self.output_layers is not None:
            try:
                builtin_scheme(self.output_layers)
            except KeyError:
                return "output_layers", (f"unknown scheme {self.output_layers!r}; one of: "
                                         f"{', '.join(mixable_schemes())}")
        return None


def schemes(config: QuantizeConfig) -> list[Scheme]:
    """Every scheme this config can give a layer (the recipe's, the mix table's, the output layers')."""
    extra = [config.output_layers] if config.output_layers is not None else []
    return [Scheme("recipe", config.weight, config.activation)] + \
        [builtin_scheme(name) for name in [*config.mix.values(), *extra]]


def scheme_for(config: QuantizeConfig, layer: str, *, output_layer: bool = False) -> tuple[Scheme, str]:
    """The layer's scheme and the key that chose it: the first `mix` glob matching its name
    ("mix"), else `output_layers` for a layer feeding a model output ("output_layers"), else
    the recipe's ("recipe")."""
    for glob, name in config.mix.items():
        if fnmatch.fnmatchcase(layer, glob):
            return builtin_scheme(name), "mix"
    if output_layer and config.output_layers is not None:
        return builtin_scheme(config.output_layers), "output_layers"
    return Scheme("recipe", config.weight, config.activation), "recipe"
