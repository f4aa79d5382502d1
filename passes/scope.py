"""Which layers a pass touches: its recipe's `include` / `exclude` globs on node names."""

from __future__ import annotations

import fnmatch


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def in_scope(name: str | None, config) -> bool:
    """True when `name` matches one of config.include and none of config.exclude."""
    return matches(name or "", config.include) and not matches(name or "", config.exclude)
