"""Carrying out runs (see ``quantmill.batches.batch``): here, embedded, or as flow runs submitted to the Prefect server.

Embedded, the runs of one model entry go through one pipeline (their download, calibration and F16 are shared
steps anyway); submitted, each run is its own flow run of the ``quantmill-pipeline/<pool>`` deployment, named
by the run's id, so the server shows exactly the runs a batch, watch or trigger asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from quantmill.batches.batch import Run, groups
from quantmill.config import compose


@dataclass
class RunResult:
    id: str
    ok: bool
    ran: int = 0  # steps executed (not answered from the cache)
    cached: int = 0
    error: str | None = None
    flow_run_id: str | None = None  # submitted runs
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "ran": self.ran, "cached": self.cached, "error": self.error,
                "flow_run_id": self.flow_run_id}


def run_here(conf_dir: Path, runs: Iterable[Run], *, verbose: bool = False,
             extra: Iterable[str] = ()) -> list[RunResult]:
    """Run each group of runs as one pipeline from this process (on pools, every group in one parent flow run);
    a failing group never stops the next."""
    from quantmill.cli.commands import run_configs
    from quantmill.errors import QuantmillError
    from quantmill.outcome import CACHED, RAN

    slots: list[list[RunResult]] = []  # each group's results, in the groups' order
    composed = []
    for overrides, members in groups(runs):
        recipes = list(dict.fromkeys(r.recipe for r in members))
        try:
            cfg = compose([*overrides, *extra, f"recipe=[{','.join(recipes)}]"], conf_dir=conf_dir)
        except QuantmillError as e:
            slots.append([RunResult(r.id, False, error=str(e)) for r in members])
            continue
        composed.append((len(slots), members, cfg))
        slots.append([])
    for (slot, members, _), outcomes in zip(composed, run_configs([cfg for *_, cfg in composed], verbose=verbose)):
        if isinstance(outcomes, QuantmillError):
            slots[slot] = [RunResult(r.id, False, error=str(outcomes)) for r in members]
            continue
        for run in members:
            mine = [o for o in outcomes if o.recipe in (None, run.recipe)]
            failed = [o for o in mine if not o.ok]
            slots[slot].append(RunResult(
                run.id, not failed, ran=sum(o.status == RAN for o in mine),
                cached=sum(o.status == CACHED for o in mine),
                error="; ".join(f"{o.spec_id}: {o.error}" for o in failed) or None,
                steps=[o.to_json() for o in mine]))
    return [r for slot in slots for r in slot]


def submit(conf_dir: Path, runs: Iterable[Run], *, pool: str | None = None, verbose: bool = False,
           extra: Iterable[str] = (), tags: Iterable[str] = ()) -> list[RunResult]:
    """Submit each run as a flow run of its pipeline deployment; returns at once with the flow run ids."""
    from quantmill.prefect import runner

    results = []
    connected = False
    for run in runs:
        cfg = compose([*run.compose_overrides(), *extra], conf_dir=conf_dir)
        if not connected:
            runner.connect(cfg.infra, verbose=verbose)
            connected = True
        flow_run_id = runner.submit_pipeline(cfg, name=run.id, pool=pool or cfg.infra.pipeline_pool,
                                             tags=[f"origin:{run.origin}", *tags])
        results.append(RunResult(run.id, True, flow_run_id=flow_run_id))
    return results
