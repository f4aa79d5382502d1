"""Recipes: YAML files declaring an ordered list of passes with their options.

`load_recipe` accepts a built-in name (`w8a8`) or a path, validates every pass and
key against the registry, and checks the step order against the passes' contracts
(compiler/facts.py) — all before any work on the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .config import build_config, config_to_dict
from .errors import RecipeError
from .facts import check_order
from .pass_catalog import all_passes, get_pass
from .recipe_files import builtin_recipes, read_yaml
from .registry import PassSpec

API_VERSION = "qcompile/v1"
_TOP_KEYS = {"apiversion", "metadata", "spec"}
# written into recipe.resolved.yaml for the record; accepted and ignored on input
_RECORD_KEYS = {"target", "provenance"}
_SPEC_KEYS = {"passes"}


@dataclasses.dataclass(frozen=True)
class Step:
    spec: PassSpec
    config: Any
    origin: str  # "recipe" or "target"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    file: str
    steps: tuple[Step, ...]

    def to_dict(self) -> dict:
        return {
            "apiversion": API_VERSION,
            "metadata": {"name": self.name, "description": self.description, "source": self.file},
            "spec": {"passes": [{"type": s.spec.name, **config_to_dict(s.config)}
                                for s in self.steps if s.origin == "recipe"]},
        }

    def target_steps(self) -> list[dict]:
        return [{"type": s.spec.name, **config_to_dict(s.config)} for s in self.steps if s.origin == "target"]


def resolve_recipe_path(name_or_path: str) -> Path:
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return builtins[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file not found: {path}")
        return path
    raise RecipeError(f"unknown recipe {name_or_path!r}",
                      hint=f"built-in recipes: {', '.join(sorted(builtins))}; or pass a path to a .yaml file")


def parse_steps(entries: Any, file: str, origin: str) -> list[Step]:
    if not isinstance(entries, list) or not entries:
        raise RecipeError("expected a non-empty list of passes", file=file, key="spec.passes")
    steps = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "type" not in entry:
            raise RecipeError("each pass needs a 'type'", file=file, key=f"spec.passes[{i}]")
        options = dict(entry)
        pass_type = options.pop("type")
        spec = get_pass(str(pass_type))
        if spec is None:
            raise RecipeError(f"unknown pass {pass_type!r}", file=file, key=f"spec.passes[{i}].type",
                              hint=f"known passes: {', '.join(all_passes())} (see `qcompile passes`)")
        cfg = build_config(spec.cls.Config, options, file=file, pass_name=spec.name)
        steps.append(Step(spec, cfg, origin))
    return steps


def load_recipe(name_or_path: str, extra_steps: list[Step] | None = None) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    file = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with apiversion, metadata and spec", file=file)
    unknown = sorted(set(data) - _TOP_KEYS - _RECORD_KEYS)
    if unknown:
        raise RecipeError(f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})", file=file, key=unknown[0])
    if data.get("apiversion", API_VERSION) != API_VERSION:
        raise RecipeError(f"unsupported apiversion {data['apiversion']!r}, expected {API_VERSION}",
                          file=file, key="apiversion")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise RecipeError("expected a mapping", file=file, key="metadata")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise RecipeError("missing 'spec' mapping with a 'passes' list", file=file, key="spec")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise RecipeError("unknown key (known: passes)", file=file, key=f"spec.{unknown[0]}")
    steps = parse_steps(spec.get("passes"), file, "recipe") + list(extra_steps or [])
    check_order(steps, file, all_passes())
    return Recipe(str(meta.get("name", path.stem)), str(meta.get("description", "")), file, tuple(steps))


def apply_settings(recipe: Recipe, settings: tuple[str, ...]) -> Recipe:
    """`--set PASS.KEY[.KEY...]=VALUE` (VALUE read as YAML) on every step of type PASS, each
    step's config rebuilt and checked exactly as a recipe file's would be."""
    if not settings:
        return recipe
    steps = list(recipe.steps)
    for setting in settings:
        target, sep, raw = setting.partition("=")
        pass_name, _, key = target.strip().partition(".")
        if not sep or not key:
            raise RecipeError(f"{setting!r} is not PASS.KEY=VALUE", file="--set",
                              hint="e.g. --set quantize.weight.group_size=128")
        hits = [i for i, s in enumerate(steps) if s.spec.name == pass_name]
        if not hits:
            raise RecipeError(f"{setting!r}: no {pass_name!r} step in this compile", file="--set",
                              hint=f"steps: {', '.join(s.spec.name for s in steps)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        for i in hits:
            options = config_to_dict(steps[i].config)
            node, path = options, key.split(".")
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {} if node.get(part) is None else node[part]
                    if not isinstance(node[part], dict):
                        raise RecipeError(f"{setting!r}: {part!r} is not a mapping", file="--set",
                                          pass_name=pass_name, key=key)
                node = node[part]
            node[path[-1]] = value
            config = build_config(steps[i].spec.cls.Config, options, file="--set", pass_name=pass_name)
            steps[i] = dataclasses.replace(steps[i], config=config)
    return dataclasses.replace(recipe, steps=tuple(steps))
