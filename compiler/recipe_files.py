"""Where the built-in recipes live and how a recipe file is read (no pass imported)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> its YAML file (compiler/recipes/*.yaml)."""
    folder = importlib.resources.files("qcompile") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"cannot read recipe: {err.strerror}", file=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"not valid YAML{where}: {problem}", file=str(path)) from None


def description(path: Path) -> str:
    """A recipe file's metadata.description ('' when it has none)."""
    data = read_yaml(path) or {}
    meta = data.get("metadata") if isinstance(data, dict) else None
    return str((meta or {}).get("description", "")) if isinstance(meta, dict) else ""
