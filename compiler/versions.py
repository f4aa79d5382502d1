"""Installed package versions: provenance in recipe.resolved.yaml, headers of generated sources."""

from __future__ import annotations

import importlib.metadata


def package_version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
