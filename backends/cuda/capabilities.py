"""What a CUDA architecture's tensor cores take, checked before any work: FP8 (E4M3) exists from
sm89 (Ada) on; an sm80 (Ampere) target asked for it is refused, naming the layers, instead of an
engine TensorRT builds in a slower precision or refuses."""

from __future__ import annotations

_FP8 = ("float8", "fp8", "e4m3", "e5m2")


def _fp8(dtype) -> bool:
    return any(k in str(dtype).lower() for k in _FP8)


def check_recipe(target, recipe) -> str | None:
    """The family hook `qcompile.targets.check_capabilities` calls: every scheme a quantize step
    can give a layer, against the architecture's `fp8` flag."""
    if target.setting("fp8", False):
        return None
    for step in recipe.steps:
        if step.spec.name != "quantize":
            continue
        for scheme in step.spec.cls.schemes(step.config):
            if scheme.is_float:
                continue
            uses = [what for what, d in (("weights", scheme.weight and scheme.weight.dtype),
                                         ("activations", scheme.activation and scheme.activation.dtype)) if _fp8(d)]
            if not uses:
                continue
            config = step.config
            where = (f"layers {list(config.include)}" + (f" minus {list(config.exclude)}" if config.exclude else "")
                     if scheme.name == "recipe" else
                     f"layers {[g for g, n in config.mix.items() if n == scheme.name]} (mix: {scheme.name})")
            return (f"pass 'quantize': {where}: FP8 {' and '.join(uses)} need FP8 tensor cores, which "
                    f"{target.name}:{target.variant} ({target.setting('gpu')}) lacks; FP8 starts with sm89 "
                    "(--target cuda:sm89 or cuda:sm90), or use int8 (w8a8)")
    return None
