"""Target descriptors: data (YAML shipped in each backend package) that says what
a target can run, and which lowering passes turn the QDQ graph into its artifact.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .errors import TargetError, UsageError

# Backend packages whose *.yaml files are target descriptors.
BACKEND_PACKAGES = ("qcompile.backends.cpu", "qcompile.backends.ascend", "qcompile.backends.cuda")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    summary: str
    family: str
    opset_min: int
    opset_convert_to: int
    weight_dtypes: tuple[str, ...]
    activation_dtypes: tuple[str, ...]
    weight_granularity: tuple[str, ...]
    activation_granularity: tuple[str, ...]
    lowering: tuple[dict, ...]
    raw: dict
    variant: str | None = None  # e.g. the CPU ISA the compile is tuned for

    def setting(self, key: str, default: Any = None) -> Any:
        """A variant's value for `key`, falling back to the descriptor's."""
        if self.variant:
            value = self.raw.get("variants", {}).get(self.variant, {}).get(key)
            if value is not None:
                return value
        return self.raw.get(key, default)


@lru_cache(maxsize=None)
def _descriptors() -> dict[str, dict]:
    found = {}
    for package in BACKEND_PACKAGES:
        importlib.import_module(package)
        for res in importlib.resources.files(package).iterdir():
            if res.name.endswith(".yaml"):
                data = yaml.safe_load(Path(str(res)).read_text())
                found[data["name"]] = data
    return found


def list_targets() -> dict[str, dict]:
    return dict(sorted(_descriptors().items()))


def load_target(spec: str) -> Target:
    """`NAME` or `NAME:VARIANT` (e.g. `cpu:avx512_vnni`); bare `cpu` detects the host."""
    name, _, variant = spec.partition(":")
    data = _descriptors().get(name)
    if data is None:
        raise UsageError(f"unknown target {spec!r}", hint=f"known targets: {', '.join(list_targets())} "
                                                            "(see `qcompile targets`)")
    variants = data.get("variants", {})
    if variant and variant not in variants:
        raise UsageError(f"target {name!r} has no variant {variant!r}",
                         hint=f"variants: {', '.join(variants)}")
    if not variant and data.get("detect") == "host_isa":
        from .hostinfo import detect_isa
        variant = detect_isa(list(variants))
    if not variant:
        variant = data.get("default_variant")
    return Target(
        name=name, summary=data.get("summary", ""), family=data.get("family", name),
        opset_min=int(data["opset"]["min"]), opset_convert_to=int(data["opset"]["convert_to"]),
        weight_dtypes=tuple(data["dtypes"]["weight"]), activation_dtypes=tuple(data["dtypes"]["activation"]),
        weight_granularity=tuple(data["granularity"]["weight"]),
        activation_granularity=tuple(data["granularity"]["activation"]),
        lowering=tuple(data.get("lowering", [])), raw=data, variant=variant or None)


def check_capabilities(target: Target, recipe) -> None:
    """Refuse, before any work, a recipe asking for what the target lacks.

    The target family's package may define `check_recipe(target, recipe) -> str | None`
    (e.g. qcompile.backends.ascend: SoC capabilities); it runs first, then each pass's
    `check_target`.
    """
    family_check = getattr(importlib.import_module(f"qcompile.backends.{target.family}"), "check_recipe", None) \
        if f"qcompile.backends.{target.family}" in BACKEND_PACKAGES else None
    problem = family_check(target, recipe) if family_check is not None else None
    if problem:
        raise TargetError(f"{recipe.file}: {problem}")
    for step in recipe.steps:
        check = getattr(step.spec.cls, "check_target", None)
        if check is None:
            continue
        problem = check(step.config, target)
        if problem:
            raise TargetError(f"{recipe.file}: pass '{step.spec.name}': {problem}")
