"""What an Ascend SoC can run, as data from its descriptor, and the checks made against it.

* `check_recipe(target, recipe)`: called by `qcompile.targets.check_capabilities` before any
  work; a quantize pass asking for what the SoC lacks (fp8, bf16 where absent, int4, per-token
  or uint8/asymmetric activations, asymmetric weights) is an error naming the layer scope, the
  feature and what the chip supports.
* `unconfirmed_in_use(target, features)`: the descriptor's `confirmed: false` claims a compile
  relies on (the lowering warns about them).
* `atc_ops(target)` / `ops_outside_atc(model, target)`: ATC's ONNX operator list (a data file
  in this package) and the deploy graph's operators missing from it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
from functools import lru_cache

import onnx_ir as ir

# Features qcompile's Ascend lowering produces today (the chip may support more).
IMPLEMENTED = ("int8", "weight_only_int8")

_FP8 = ("fp8", "float8", "e4m3", "e5m2")


def capabilities(target) -> dict[str, dict]:
    return dict(target.raw.get("capabilities", {}))


def soc_version(target) -> str:
    return str(target.setting("soc_version"))


def supported_summary(target) -> str:
    parts = []
    for cap in capabilities(target).values():
        if cap.get("supported"):
            parts.append(cap.get("what", "?") + ("" if cap.get("confirmed", True) else " (unconfirmed)"))
    return "; ".join(parts)


def _scope(config) -> str:
    include = list(getattr(config, "include", ("*",)))
    exclude = list(getattr(config, "exclude", ()))
    return f"layers {include}" + (f" minus {exclude}" if exclude else "")


def _dtype_feature(dtype: str, *, weight: bool, weight_only: bool) -> str | None:
    """The capability a requested dtype needs (None: plain int8, checked elsewhere)."""
    d = str(dtype).lower()
    if any(k in d for k in _FP8):
        return "fp8"
    if d in ("bf16", "bfloat16"):
        return "bf16"
    if d in ("fp16", "float16"):
        return "fp16"
    if d in ("int4", "uint4"):
        return "int4_weight_only" if (weight and weight_only) else "int4_activations" if not weight else "int4_w4a8"
    return None


def requested_features(config, target) -> tuple[list[str], str | None]:
    """(capabilities a quantize config needs, or a refusal that no capability can lift)."""
    weight = getattr(config, "weight", None)
    act = getattr(config, "activation", None)
    weight_only = act is None
    features: list[str] = []
    if weight is not None:
        wd = str(weight.dtype).lower()
        if wd == "uint8":
            return [], ("uint8 weights requested, but Ascend's int8 Conv/MatMul/Gemm take int8 weights "
                        "(symmetric, offset 0); use weight.dtype: int8")
        feature = _dtype_feature(wd, weight=True, weight_only=weight_only)
        if feature is None and wd == "int8":
            feature = "weight_only_int8" if weight_only else "int8"
        if feature is None:
            return [], f"weight dtype {wd!r} has no Ascend lowering"
        features.append(feature)
        if getattr(weight, "granularity", "per_channel") == "per_group":
            return features, ("per_group weights requested, but AscendDequant's deq_scale holds one scale per "
                              "output channel (or per tensor); use weight.granularity: per_channel")
        if not getattr(weight, "symmetric", True):
            return features, ("asymmetric weights (weight.symmetric: false) requested, but Ascend's int8 "
                              "kernels take symmetric weights (no weight offset); use weight.symmetric: true")
    if act is not None:
        ad = str(act.dtype).lower()
        if ad == "auto":
            ad = str(target.setting("activation_dtype", "int8"))
        if ad == "uint8":
            return features, ("uint8 activations requested, but AscendQuant outputs int8 (its offset shifts "
                              "int8 values; there is no uint8 output); use activation.dtype: int8 or auto")
        feature = _dtype_feature(ad, weight=False, weight_only=False)
        if feature is not None:
            features.append(feature)
        elif ad != "int8":
            return features, f"activation dtype {ad!r} has no Ascend lowering"
        granularity = str(getattr(act, "granularity", "per_tensor"))
        if granularity != "per_tensor":
            features.append("per_token_activations")
        elif getattr(act, "dynamic", False):
            return features, ("dynamic activations requested, but AscendQuant takes its scale and offset as "
                              "attributes fixed at compile time; use calibrated (static) activations")
        if getattr(act, "symmetric", "auto") is False:
            return features, (
                "asymmetric activations (activation.symmetric: false) requested: an AscendQuant offset != 0 "
                "would be wrong at Conv borders (ATC's int8 Conv pads with 0 in the int8 domain) and needs "
                "an offset correction of the int32 bias that the deploy graph has no place for; qcompile's "
                "Ascend targets use symmetric int8 activations (offset 0): use activation.symmetric: true or auto")
    return features, None


_FEATURE_NAMES = {
    "int8": "int8 W8A8", "weight_only_int8": "int8 weight-only (W8A16, AscendAntiQuant)",
    "int4_weight_only": "int4 weight-only", "int4_w4a8": "int4 weights with int8 activations (W4A8)",
    "int4_activations": "int4 activations", "fp8": "fp8", "bf16": "bf16", "fp16": "fp16 compute",
    "per_token_activations": "per-token (non per-tensor) activation scales",
}


def check_quantize(config, target) -> str | None:
    """Why `target` cannot run what this quantize config asks for (None: it can)."""
    scope = _scope(config)
    soc = soc_version(target)
    caps = capabilities(target)
    features, refusal = requested_features(config, target)
    for feature in features:
        what = _FEATURE_NAMES.get(feature, feature)
        cap = caps.get(feature)
        if cap is None or not cap.get("supported"):
            note = f" ({cap['note']})" if cap and cap.get("note") else ""
            return (f"{scope}: {what} requested, but {target.name} ({soc}) does not support it{note}; "
                    f"{target.name} supports: {supported_summary(target)}")
        if feature not in IMPLEMENTED:
            unconfirmed = "" if cap.get("confirmed", True) else " (and that is unconfirmed)"
            return (f"{scope}: {what} requested; {soc} supports it{unconfirmed}, but qcompile's Ascend "
                    f"lowering does not produce it yet (it produces: "
                    f"{', '.join(_FEATURE_NAMES[f] for f in IMPLEMENTED)}); use recipe w8a8 or w8a16")
    if refusal:
        return f"{scope}: {refusal} ({target.name}, {soc})"
    return None


def check_recipe(target, recipe) -> str | None:
    """The family hook `qcompile.targets.check_capabilities` calls before any work.

    Every scheme a quantize step can give a layer is checked: the recipe's own and
    each one its `mix` table names; a `sparsify` step's 2:4 pattern needs ATC's --sparsity."""
    for step in recipe.steps:
        if step.spec.name == "sparsify":
            problem = check_sparsity(step.config, target)
            if problem:
                return f"pass 'sparsify': {problem}"
            continue
        if step.spec.name != "quantize":
            continue
        for scheme in step.spec.cls.schemes(step.config):
            if scheme.is_float:
                continue
            config = step.config if scheme.name == "recipe" else _MixScope(
                include=tuple(g for g, n in step.config.mix.items() if n == scheme.name),
                weight=scheme.weight, activation=scheme.activation)
            problem = check_quantize(config, target)
            if problem:
                return f"pass 'quantize': {problem}"
    return None


def check_sparsity(config, target) -> str | None:
    """2:4 sparsity is only worth its accuracy where ATC compresses it (`sparsity_2_4`)."""
    if getattr(config, "pattern", None) != "2:4":
        return None
    cap = capabilities(target).get("sparsity_2_4", {})
    if cap.get("supported"):
        return None
    return (f"2:4 structured sparsity requested, but {target.name} ({soc_version(target)}) cannot compress it"
            + (f" ({cap['note']})" if cap.get("note") else "") + "; the pruned zeros would be stored and computed "
            "dense: use a target that has it (ascend310b, ascend910b) or drop the sparsify step")


def sparsity_flags(target, patterns: set[str]) -> tuple[list[str], list[str]]:
    """(extra atc flags, notes) for the sparsity patterns the compile's weights were pruned to."""
    flags, notes = [], []
    if "2:4" in patterns and capabilities(target).get("sparsity_2_4", {}).get("supported"):
        flags.append("--sparsity=1")
        notes.append("--sparsity=1: ATC stores the 2:4-pruned int8 weights of Conv2D/MatMulV2/FullyConnection as "
                     "2 values + two 2-bit indexes per 4 (it cannot be combined with --compress_weight_conf)")
    if "unstructured" in patterns:
        notes.append("unstructured sparsity: ATC compresses only 2:4 along Cin, so these zeros are stored dense")
    return flags, notes


@dataclasses.dataclass(frozen=True)
class _MixScope:
    """The layers a mix entry covers, shaped like a quantize config for the checks above."""
    include: tuple[str, ...]
    weight: object
    activation: object
    exclude: tuple[str, ...] = ()


def unconfirmed_in_use(target, features) -> list[str]:
    """Warnings for capabilities a compile relies on that the descriptor marks unconfirmed."""
    caps = capabilities(target)
    out = []
    for feature in sorted(set(features)):
        cap = caps.get(feature, {})
        if cap.get("supported") and not cap.get("confirmed", True):
            out.append(f"{target.name}: {cap.get('what', feature)} is unconfirmed on {soc_version(target)}"
                       + (f" ({cap['note']})" if cap.get("note") else "")
                       + "; check the ATC conversion and the results on the device")
    return out


@lru_cache(maxsize=None)
def _read_op_list(filename: str) -> tuple[str, ...]:
    text = (importlib.resources.files("qcompile.backends.ascend") / filename).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def atc_ops(target) -> tuple[str, ...]:
    return _read_op_list(str(target.raw.get("atc_ops", "atc_onnx_ops.txt")))


def ops_outside_atc(model: ir.Model, target) -> dict[str, int]:
    """Operator types of the graph (default domain) that ATC's ONNX list lacks, with counts."""
    known = {op.lower() for op in atc_ops(target)}
    counts = collections.Counter(n.op_type for n in model.graph
                                 if n.domain in ("", "ai.onnx") and n.op_type.lower() not in known)
    others = collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph if n.domain not in ("", "ai.onnx"))
    counts.update(others)
    return dict(sorted(counts.items()))
