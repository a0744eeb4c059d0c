"""The plan's data: step specs, their cache keys, the plan itself, and what the store already holds of it.

Each spec names its step, the backend that does it, its inputs (other specs), its resolved config, the
capability it needs and the tool versions it runs. Its cache key (``step_key``) is the hash of all of that plus
the digests of its inputs, so it is known as soon as its inputs exist, and the same key means the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from quantmill import constants as C
from quantmill.backends import PUBLISHERS
from quantmill.backends.base import SourceInfo
from quantmill.config import QuantmillConfig
from quantmill.digest import canonical_json, sha256_bytes
from quantmill.errors import StoreFullError
from quantmill.store.local import ArtifactRef, LocalStore, Store

# Bump a step's version when its output bytes change for the same inputs and config.
IMPLEMENTATION_VERSIONS = {C.DOWNLOAD: "2", C.MERGE: "1", C.CALIBRATE: "2", C.CONVERT: "1", C.QUANTIZE: "1",
                           C.VALIDATE: "2", C.PUBLISH: "2"}
HIT, MISS, PENDING = "hit", "miss", "pending"


@dataclass(frozen=True)
class StepSpec:
    """One node of the plan.

    Attributes:
        id: Unique in the plan, e.g. ``quantize:gguf_q4_k_m``.
        step: The pipeline verb (download, calibrate, convert, quantize, validate, publish).
        backend: the key of the backend that does it, in its kind's table.
        capability: What the machine running it must offer (cpu, cuda, mlx, llamacpp), from its backend.
        inputs: Input name -> id of the spec that produces it.
        config: The resolved settings that determine the output: hashed into the key.
        context: Execution details that do not change the output (paths, labels, threads): not hashed.
        tools: Tool versions the step runs: hashed into the key.
        recipe: The recipe this spec belongs to (None for shared specs).
    """

    id: str
    step: str
    backend: str
    capability: str
    inputs: Mapping[str, str]
    config: Mapping[str, Any]
    context: Mapping[str, Any] = field(default_factory=dict)
    tools: Mapping[str, str] = field(default_factory=dict)
    recipe: str | None = None

    @property
    def impl_version(self) -> str:
        return IMPLEMENTATION_VERSIONS[self.step]


def step_key(spec: StepSpec, inputs: Mapping[str, ArtifactRef]) -> str:
    """The cache key: step, implementation version, backend, resolved config, tool versions, input digests."""
    missing = set(spec.inputs) - set(inputs)
    if missing:
        raise ValueError(f"{spec.id}: inputs {sorted(missing)} not resolved")
    return sha256_bytes(canonical_json({
        "step": spec.step, "implementation": spec.impl_version, "backend": spec.backend,
        "config": spec.config, "tools": spec.tools,
        "inputs": {name: inputs[name].digest for name in sorted(spec.inputs)},
    }))


@dataclass
class Plan:
    config: QuantmillConfig
    source: SourceInfo
    specs: dict[str, StepSpec]  # in topological order
    warnings: list[str] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # spec id -> pool (infra=prefect)

    def __iter__(self) -> Iterator[StepSpec]:
        return iter(self.specs.values())


@dataclass
class Resolution:
    """What the store already holds for each spec: ``hit`` (key known, artifact present), ``miss`` (key known,
    absent) or ``pending`` (an input is not built yet, so the key is not known yet and the step will run)."""

    status: dict[str, str]
    keys: dict[str, str]
    refs: dict[str, ArtifactRef]

    @property
    def all_cached(self) -> bool:
        return all(s == HIT for s in self.status.values())


def resolve(plan: Plan, store: Store) -> Resolution:
    """Look each spec's key up in the store, in topological order, as far as inputs are known."""
    status: dict[str, str] = {}
    keys: dict[str, str] = {}
    refs: dict[str, ArtifactRef] = {}
    for spec in plan:
        if all(i in refs for i in spec.inputs.values()):
            key = step_key(spec, {name: refs[sid] for name, sid in spec.inputs.items()})
            keys[spec.id] = key
            found = store.lookup_intact(key, spec.id)
            if found is not None and spec.step == C.PUBLISH and not _registered(spec, store, found):
                found = None
            if found is not None:
                refs[spec.id] = found
            status[spec.id] = HIT if found is not None else MISS
        else:
            status[spec.id] = PENDING
    return Resolution(status, keys, refs)


def _registered(spec: StepSpec, store: Store, ref: ArtifactRef) -> bool:
    """A publish is only cached if the registry still holds what it published."""
    return PUBLISHERS.get(spec.backend).is_published(spec, store, ref)


def check_space(plan: Plan, resolution: Resolution, store: Store) -> None:
    """Refuse to start when the steps that will run need more space than the store has (estimates)."""
    need = sum(int(spec.context.get("estimate_bytes", 0)) for spec in plan
               if resolution.status[spec.id] != HIT)
    if not isinstance(store, LocalStore) or need == 0:
        return
    free = store.free_bytes()
    if store.quota_bytes is not None:
        free = min(free, store.quota_bytes - store.used_bytes())
    if need > free:
        raise StoreFullError(f"store {store.root} has {free} bytes available but this run needs about {need}; "
                             f"free space, raise store.quota_bytes, or set store.root to a larger disk")
