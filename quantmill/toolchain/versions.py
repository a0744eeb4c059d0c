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


def check_tools(tools: dict[str, str], *, pool: str | None = None) -> list[str]:
    """What differs between the tool versions a spec was keyed with and this machine's; empty: the same.

    A worker runs a spec only if it would make the bytes the key promises, so the parent's plan and every worker
    must run the same versions. Entries this machine cannot check (a legacy environment's) are skipped.
    """
    from quantmill.toolchain.hardware import machine_class

    problems = []
    for name, expected in sorted(tools.items()):
        if name == "llama.cpp":
            from quantmill.errors import PreflightError
            from quantmill.toolchain.llamacpp import locate

            try:
                actual = locate().version
            except PreflightError as e:
                actual = f"missing ({e})"
        elif name == "machine":
            actual = f"pool {pool}" if expected.startswith("pool ") else machine_class()
        elif ":" in name or name in ("flash_attention",):
            continue
        else:
            actual = package_version(name)
        if actual != expected:
            problems.append(f"{name} {actual} (planned: {expected})")
    return problems
