"""Versions of installed packages, for cache keys and provenance (no imports of the packages themselves)."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def package_versions(*names: str) -> dict[str, str]:
    return {name: package_version(name) for name in names}
