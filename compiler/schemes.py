"""Quantization schemes: what a layer's weights and activations become.

A scheme is the pair (`WeightScheme`, `ActivationScheme | None`) a `quantize` pass config
carries; `activation: null` means weight-only. Each dataclass validates the combinations
no backend can run (asymmetric FP8, per-token uint8, per-group FP8 ...) so a recipe
fails on its key before any work. The built-in recipes are the named schemes: a
per-scope `mix` table in a recipe refers to them by name (`w4a16`, `fp8`, ...) or `float`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from .config import build_config
from .recipe_files import builtin_recipes, read_yaml

WeightDType = Literal["int8", "uint8", "int4", "uint4", "float8e4m3fn", "float8e5m2"]
ActivationDType = Literal["auto", "int8", "uint8", "int4", "uint4", "float8e4m3fn", "float8e5m2"]
Rounding = Literal["half_even", "half_away", "floor", "ceil", "trunc", "stochastic"]

FLOAT8 = ("float8e4m3fn", "float8e5m2")
_PLAIN_PASSES = {"canonicalize", "fuse", "calibrate", "quantize"}
INT4 = ("int4", "uint4")

# Lowest ONNX opset whose QuantizeLinear/DequantizeLinear carry each feature.
_OPSET_FOR_DTYPE = {"float8e4m3fn": 19, "float8e5m2": 19, "int4": 21, "uint4": 21}
_OPSET_FOR_BLOCKS = 21  # DequantizeLinear's block_size attribute


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    dtype: WeightDType = "int8"
    # per_group: blocks of `group_size` along the reduction axis (MatMul/Gemm; ONNX block_size)
    granularity: Literal["per_channel", "per_tensor", "per_group"] = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    reduce_range: bool = False  # 7-bit weights (onnxruntime's guard against U8S8 overflow)
    # symmetric int4: map each group's largest-magnitude weight to -8, its sign carried by the
    # scale (onnxruntime's RTN and llama.cpp's q4_0 convention): 16 levels instead of 15
    full_range: bool = False
    rounding: Rounding = "half_even"
    seed: int = 0  # for stochastic rounding: the same seed gives the same weights

    def validate(self) -> tuple[str, str] | None:
        if self.granularity == "per_group" and self.group_size < 2:
            return "group_size", f"group_size must be at least 2, got {self.group_size}"
        if self.dtype in FLOAT8:
            if not self.symmetric:
                return "symmetric", f"{self.dtype} weights are symmetric (FP8 has no zero point offset)"
            if self.rounding != "half_even":
                return "rounding", (f"{self.dtype} rounds to nearest even (the ONNX cast); "
                                    f"rounding {self.rounding!r} applies to integer dtypes")
        if self.full_range and (self.dtype != "int4" or not self.symmetric):
            return "full_range", f"full_range applies to symmetric int4 weights, not {self.label()}"
        if self.reduce_range and self.dtype not in ("int8", "uint8"):
            return "reduce_range", f"reduce_range applies to 8-bit weights, not {self.dtype}"
        return None

    def min_opset(self) -> int:
        need = _OPSET_FOR_DTYPE.get(self.dtype, 13)
        return max(need, _OPSET_FOR_BLOCKS) if self.granularity == "per_group" else need

    def label(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        return f"{self.dtype} {gran}" + ("" if self.symmetric else " asym") + (" 7-bit" if self.reduce_range else "")


@dataclasses.dataclass(frozen=True)
class ActivationScheme:
    dtype: ActivationDType = "auto"  # auto: what the target's int8 kernels want
    # per_token: one scale per row (last axis), computed at run time; per_group: one per block
    # of the weight's group_size along each row, computed at run time inside the matmul kernel
    # (onnxruntime's MatMulNBits with int8 compute: no activation Q/DQ in the graph)
    granularity: Literal["per_tensor", "per_token", "per_group"] = "per_tensor"
    symmetric: bool | Literal["auto"] = "auto"  # auto: the target's `activation_symmetric`
    dynamic: bool = False  # scales computed at run time instead of calibrated (per_token always is)

    def validate(self) -> tuple[str, str] | None:
        if self.dtype in FLOAT8 and self.symmetric is False:
            return "symmetric", f"{self.dtype} activations are symmetric (FP8 has no zero point offset)"
        if self.is_dynamic:
            if self.dtype in FLOAT8 or self.dtype in INT4:
                return "dtype", (f"dynamic activations are 8-bit integers (DynamicQuantizeLinear, "
                                 f"MatMulInteger); {self.dtype} is static only")
            if self.granularity in ("per_token", "per_group"):
                what = "one scale per row" if self.granularity == "per_token" else "one scale per block of a row"
                if self.dtype not in ("auto", "int8"):
                    return "dtype", f"{self.granularity} activations are int8 (symmetric, {what})"
                if self.symmetric is False:
                    return "symmetric", f"{self.granularity} activations are symmetric int8 ({what}, no offset)"
            else:
                if self.dtype not in ("auto", "uint8"):
                    return "dtype", "dynamic per_tensor activations are uint8 (ONNX DynamicQuantizeLinear)"
                if self.symmetric is True:
                    return "symmetric", "dynamic per_tensor activations are asymmetric uint8 (DynamicQuantizeLinear)"
        return None

    @property
    def is_dynamic(self) -> bool:
        return self.dynamic or self.granularity in ("per_token", "per_group")

    @property
    def in_kernel(self) -> bool:
        """Quantized inside the matmul kernel (per_group), not by nodes in the graph."""
        return self.granularity == "per_group"

    def min_opset(self) -> int:
        # per-token: ReduceMax takes its axes as an input from opset 18
        return max(_OPSET_FOR_DTYPE.get(self.dtype, 13), 18 if self.granularity == "per_token" else 13)

    def label(self, dtype: str | None = None) -> str:
        d = dtype or self.dtype
        return f"{d} {'dynamic ' if self.is_dynamic else ''}{self.granularity}"


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What one layer gets; `weight is None` means it stays float."""

    name: str
    weight: WeightScheme | None
    activation: ActivationScheme | None

    @property
    def is_float(self) -> bool:
        return self.weight is None

    def label(self) -> str:
        """"W[int8 per_channel] A[uint8 per_tensor]", prefixed by the name of a mixed-in scheme."""
        act = self.activation
        body = f"W[{self.weight.label()}] A[{act.label() if act is not None else 'float'}]"
        return body if self.name == "recipe" else f"{self.name}: {body}"


def scheme_compatibility(weight: WeightScheme, activation: ActivationScheme | None) -> tuple[str, str] | None:
    """Combinations of a weight and an activation scheme no lowering can run."""
    if activation is not None and activation.in_kernel:
        if weight.granularity != "per_group" or weight.dtype not in ("int8", "int4") or not weight.symmetric:
            return "weight", ("per_group activations are quantized in the weight's groups inside the matmul "
                              f"kernel: they need symmetric int8 or int4 per_group weights; got {weight.label()}")
    elif activation is not None and activation.is_dynamic:
        if weight.dtype != "int8" or weight.granularity == "per_group":
            return "weight", ("dynamic activations multiply int8 per-channel or per-tensor weights "
                              f"(MatMulInteger/ConvInteger); got {weight.label()}")
    if activation is not None and (weight.dtype in FLOAT8) != (activation.dtype in FLOAT8) \
            and activation.dtype != "auto":
        return "activation.dtype", (f"FP8 is all or nothing: weights {weight.dtype} with activations "
                                    f"{activation.dtype} have no kernel anywhere")
    if activation is not None and activation.dtype == "auto" and weight.dtype in FLOAT8:
        return "activation.dtype", "FP8 weights need activation.dtype float8e4m3fn or float8e5m2 (not auto)"
    return None


@functools.lru_cache(maxsize=None)
def builtin_scheme(name: str) -> Scheme:
    """The quantize scheme of the built-in recipe `name` (`float`: none), for `mix` tables.

    Read from the recipe's YAML (its `quantize` step's `weight` and `activation`), so schemes
    need no pass and no recipe loader."""
    if name == "float":
        return Scheme("float", None, None)
    path = builtin_recipes().get(name)
    if path is None:
        raise KeyError(name)
    passes = ((read_yaml(path) or {}).get("spec") or {}).get("passes") or []
    steps = [p for p in passes if isinstance(p, dict) and p.get("type") == "quantize"]
    # only plain schemes: a recipe that also smooths or mixes is more than its quantize step
    if len(steps) != 1 or steps[0].get("mix") or {p.get("type") for p in passes} - _PLAIN_PASSES:
        raise KeyError(name)
    step, file = steps[0], str(path)
    weight = build_config(WeightScheme, step.get("weight") or {}, file=file, pass_name="quantize", prefix="weight.")
    act = step.get("activation", {})
    activation = None if act is None else build_config(ActivationScheme, act, file=file, pass_name="quantize",
                                                       prefix="activation.")
    return Scheme(name, weight, activation)


def mixable_schemes() -> list[str]:
    """Names a `mix` table may use."""
    names = []
    for name in sorted(builtin_recipes()):
        try:
            builtin_scheme(name)
        except KeyError:  # a recipe without a plain quantize step (e.g. itself a mix)
            continue
        names.append(name)
    return names + ["float"]
