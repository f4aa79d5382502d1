"""Typed, frozen pass configs built from recipe dictionaries.

A pass declares its options as a frozen dataclass; `build_config` turns the YAML
mapping into that dataclass, rejecting unknown keys and wrong types with the
recipe location, so nothing runs on a misspelt option.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import RecipeError


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({', '.join(f.name for f in dataclasses.fields(tp))})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: dict) -> Any:
    origin = get_origin(tp)
    key = where["key"]
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise RecipeError(f"{value!r} is not one of {_type_name(tp)}", **where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if isinstance(value, dict):  # a mapping can only mean the dataclass: report its own error
            nested = [a for a in args if dataclasses.is_dataclass(a)]
            if len(nested) == 1:
                return _coerce(value, nested[0], where)
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(f"{value!r} is not {_type_name(tp)}", **where)
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"expected null, got {value!r}", **where)
    if origin in (tuple, list):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"expected a list, got {value!r}", **where)
        return tuple(_coerce(v, item_tp, {**where, "key": f"{key}[{i}]"}) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"expected a mapping, got {value!r}", **where)
        k_tp, v_tp = get_args(tp)
        return {_coerce(k, k_tp, where): _coerce(v, v_tp, {**where, "key": f"{key}.{k}"})
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"expected a mapping with keys {_type_name(tp)}, got {value!r}", **where)
        return build_config(tp, value, file=where["file"], pass_name=where["pass_name"], prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"expected true/false, got {value!r}", **where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"expected an integer, got {value!r}", **where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"expected a number, got {value!r}", **where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"expected a string, got {value!r}", **where)
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in a pass's config


def build_config(cls: type, options: dict, *, file: str | None = None, pass_name: str | None = None,
                 prefix: str = "") -> Any:
    """Build the frozen dataclass `cls` from `options`, or raise a located RecipeError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise RecipeError(
            f"unknown key (known: {', '.join(sorted(fields)) or 'none'})",
            file=file, pass_name=pass_name, key=prefix + unknown[0])
    kwargs = {}
    for name, value in options.items():
        where = {"file": file, "pass_name": pass_name, "key": prefix + name}
        kwargs[name] = _coerce(value, hints[name], where)
    try:
        cfg = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise RecipeError(str(err), file=file, pass_name=pass_name) from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            key, message = problem
            raise RecipeError(message, file=file, pass_name=pass_name, key=prefix + key)
    return cfg


def at_least(config: Any, **minimums: int) -> tuple[str, str] | None:
    """For a config's `validate`: the first of the named fields below its minimum, as (key, message)."""
    for key, low in minimums.items():
        if getattr(config, key) < low:
            return key, f"must be at least {low}"
    return None


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-able form of a config (for the resolved recipe)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg
