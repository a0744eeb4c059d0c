"""Pool routing for infra=prefect: which pool runs each spec, and which specs travel together.

A spec goes to the first configured pool offering the capability its backend declared (never chosen by step
name). Ready specs of one pool are sent as one *segment*, extended with every later spec of the same pool whose
inputs are then all available, so a chain of same-pool steps costs one dispatch instead of one per step.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from quantmill import constants as C
from quantmill.errors import PreflightError


def describe_pools(pools: Mapping[str, object]) -> str:
    return "; ".join(f"{name} [{', '.join(p.capabilities)}]" for name, p in pools.items()) or "none"


def pool_for(capability: str, pools: Mapping[str, object]) -> str | None:
    return next((name for name, p in pools.items() if capability in p.capabilities), None)


def prefer_gpu(capability: str, pools: Mapping[str, object]) -> str:
    """The GPU variant of ``capability`` where a configured pool offers it, else ``capability`` itself."""
    gpu = C.GPU_VARIANTS.get(capability)
    return gpu if gpu and pool_for(gpu, pools) else capability


def route(specs: Iterable, pools: Mapping[str, object]) -> dict[str, str]:
    """spec id -> pool name; refuses, naming the capability and the configured pools, what no pool offers."""
    if not pools:
        raise PreflightError("infra.mode=prefect but infra.pools is empty; name at least one pool and its "
                             "capabilities in conf/infra/prefect.yaml")
    for name, pool in pools.items():
        unknown = sorted(set(pool.capabilities) - set(C.CAPABILITIES))
        if unknown:
            raise PreflightError(f"pool {name!r} offers unknown capability {', '.join(unknown)}; known: "
                                 f"{', '.join(C.CAPABILITIES)}")
    routes, missing = {}, {}
    for spec in specs:
        pool = pool_for(spec.capability, pools)
        if pool is None:
            missing.setdefault(spec.capability, []).append(spec.id)
        else:
            routes[spec.id] = pool
    if missing:
        capability, ids = next(iter(missing.items()))
        raise PreflightError(f"step {ids[0]} needs capability {capability!r}, which no pool offers (configured: "
                             f"{describe_pools(pools)}); add a pool offering it to conf/infra/, or run embedded")
    return routes


def next_segments(specs: list, routes: Mapping[str, str], done: set[str], started: set[str]) -> list[list]:
    """The segments that can start now: specs not started whose inputs are all done, grouped by pool, each
    extended with the later specs of its pool that depend only on done specs and on specs of the segment."""
    segments: dict[str, list] = {}
    members: dict[str, set[str]] = {}
    for spec in specs:  # topological order
        if spec.id in started or spec.id in done:
            continue
        pool = routes[spec.id]
        inside = members.setdefault(pool, set())
        if all(i in done or i in inside for i in spec.inputs.values()):
            segments.setdefault(pool, []).append(spec)
            inside.add(spec.id)
    return [segment for segment in segments.values() if segment]
