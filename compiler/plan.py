"""A compile plan: everything one compile will do, decided and validated before any work.

`prepare_plan` resolves the target and the recipe (keys, step order, the target's lowering
steps, capabilities) and fixes the inputs (model, data, shapes, verification). A search
strategy makes variants with `CompilePlan.adjusted` — layers kept float, config keys replaced,
statistics reused — which compose with what the plan already had.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from .errors import UsageError
from .observers import HistogramObserver
from .op_support import check_custom_op_library
from .recipe_choice import AUTO, choose_recipe
from .recipe import Recipe, apply_settings, load_recipe, parse_steps
from .sharding import Sharding, connect_ray
from .targets import Target, check_capabilities, load_target


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    enabled: bool = True
    data: Path | None = None      # held-out inputs (None: the calibration data, flagged)
    samples: int = 64


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    model: Path
    target: Target
    recipe: Recipe                       # as it runs: the user's recipe with exclusions and overrides applied
    base_recipe: Recipe                  # as the user named it
    calib: Path | None = None
    input_shapes: dict = dataclasses.field(default_factory=dict)
    verify: VerifyOptions = VerifyOptions()
    dump_after: frozenset = frozenset()
    progress: bool = True
    external_data: bool | None = None    # None: only past 2 GB
    excluded: tuple[str, ...] = ()       # node names every quantize step keeps float
    overrides: dict = dataclasses.field(default_factory=dict)   # {pass name: {key: value}}
    reuse: dict[str, HistogramObserver] | None = None           # observers of an earlier compile (same model, data)
    custom_ops: tuple[str, ...] = ()     # onnxruntime custom-op libraries every session registers
    recipe_choice: str | None = None     # why this recipe, when the user named none
    max_memory: int | None = None        # --max-memory (bytes): layer-wise under that bound
    sharding: Sharding = Sharding()      # --workers / --ray: calibration statistics across processes

    def adjusted(self, *, exclude: tuple[str, ...] = (), overrides: dict | None = None,
                 reuse: dict[str, HistogramObserver] | None = None) -> "CompilePlan":
        """This plan with `exclude` kept float too and `overrides` on top of its own (per pass,
        key by key), re-checked against the target; `reuse` replaces the reused statistics."""
        merged = {name: dict(keys) for name, keys in self.overrides.items()}
        for name, keys in (overrides or {}).items():
            merged.setdefault(name, {}).update(keys)
        excluded = self.excluded + tuple(n for n in exclude if n not in self.excluded)
        recipe = adjust_recipe(self.base_recipe, excluded, merged)
        check_capabilities(self.target, recipe)
        return dataclasses.replace(self, recipe=recipe, excluded=excluded, overrides=merged,
                                   reuse=self.reuse if reuse is None else reuse)

    def with_recipe(self, recipe_name: str) -> "CompilePlan":
        """The same compile with another recipe (no exclusions, overrides or reused statistics)."""
        recipe = recipe_for(self.target, recipe_name)
        check_capabilities(self.target, recipe)
        return dataclasses.replace(self, recipe=recipe, base_recipe=recipe, excluded=(), overrides={}, reuse=None)


def prepare(target_spec: str, recipe_name: str, exclude_layers: tuple[str, ...] = (),
            overrides: dict[str, dict] | None = None, settings: tuple[str, ...] = ()) -> tuple[Target, Recipe]:
    """Target and recipe, fully validated (recipe keys, order, target capabilities); the recipe
    with `--set` settings, `exclude_layers` and `overrides` applied."""
    target = load_target(target_spec)
    recipe = apply_settings(recipe_for(target, recipe_name), tuple(settings))
    adjusted = adjust_recipe(recipe, tuple(exclude_layers), overrides or {})
    check_capabilities(target, adjusted)
    return target, adjusted


def recipe_for(target: Target, recipe_name: str) -> Recipe:
    """`recipe_name` (built-in or path) with `target`'s lowering steps after its own, order-checked."""
    lowering = parse_steps(list(target.lowering), f"target {target.name}", "target") if target.lowering else []
    return load_recipe(recipe_name, extra_steps=lowering)


def prepare_plan(model_path, *, target: str = "cpu", recipe: str | None = None, calib=None, input_shapes=None,
                 verify: bool = True, verify_data=None, verify_samples: int = 64, dump_after=(),
                 progress: bool = True, external_data: bool | None = None, exclude_layers=(), overrides=None,
                 stats: dict | None = None, custom_ops=(), settings: tuple[str, ...] = (),
                 max_memory: int | None = None, sharding: Sharding = Sharding()) -> CompilePlan:
    choice = None
    if recipe is None or recipe == AUTO:   # decided from the model (compiler/recipe_choice.py)
        recipe, choice = choose_recipe(model_path, target, calib is not None)
    tgt, base = prepare(target, recipe, settings=settings)
    libraries = tuple(check_custom_op_library(p) for p in custom_ops)
    if sharding.ray is not None:     # a cluster that does not answer is refused before any work
        connect_ray(sharding.ray)
    plan = CompilePlan(model=Path(model_path), target=tgt, recipe=base, base_recipe=base,
                       calib=Path(calib) if calib is not None else None, input_shapes=dict(input_shapes or {}),
                       verify=VerifyOptions(verify, Path(verify_data) if verify_data is not None else None,
                                            verify_samples),
                       dump_after=frozenset(dump_after), progress=progress, external_data=external_data,
                       reuse=stats, custom_ops=libraries, recipe_choice=choice, max_memory=max_memory,
                       sharding=sharding)
    if exclude_layers or overrides:
        plan = plan.adjusted(exclude=tuple(exclude_layers), overrides=overrides)
    known = {s.spec.name for s in plan.recipe.steps}
    unknown = sorted(set(plan.dump_after) - known - {"all"})
    if unknown:
        raise UsageError(f"--dump-after {unknown[0]}: no such pass in this compile",
                         hint=f"passes here: {', '.join(s.spec.name for s in plan.recipe.steps)} (or 'all')")
    return plan


def adjust_recipe(recipe: Recipe, exclude_layers: tuple[str, ...], overrides: dict[str, dict]) -> Recipe:
    """`exclude_layers` (node names, escaped as globs) appended to every quantize step's
    `exclude`; `overrides` replacing top-level config keys of the named passes."""
    if not exclude_layers and not overrides:
        return recipe
    steps = []
    for step in recipe.steps:
        config = step.config
        changes = dict(overrides.get(step.spec.name, {}))
        if step.spec.name == "quantize" and exclude_layers:
            changes["exclude"] = tuple(config.exclude) + tuple(glob.escape(n) for n in exclude_layers)
        if changes:
            config = dataclasses.replace(config, **changes)
        steps.append(dataclasses.replace(step, config=config))
    return dataclasses.replace(recipe, steps=tuple(steps))
