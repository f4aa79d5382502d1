"""The built-in passes: importing the packages that define them registers them."""

from __future__ import annotations

from .registry import PassSpec, registered


def _load_builtin_passes() -> None:
    import qcompile.backends  # noqa: F401  (target lowering passes)
    import qcompile.passes  # noqa: F401


def get_pass(name: str) -> PassSpec | None:
    return all_passes().get(name)


def all_passes() -> dict[str, PassSpec]:
    _load_builtin_passes()
    return registered()
