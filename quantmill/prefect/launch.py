"""Launching runs: one composed config or several, here (embedded) or through the Prefect server (pools), and
the runs of batches, watches and triggers, carried out here or submitted as flow runs.

Flows are loaded by their entrypoint strings (``quantmill.prefect.deploy``), never imported: the library sits
below ``flows/``. Embedded, the runs of one model entry go through one pipeline (their download, calibration and
F16 are shared steps anyway); submitted, each run is its own flow run of the ``quantmill-pipeline/<pool>``
deployment, named by the run's id, so the server shows exactly the runs a batch, watch or trigger asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from quantmill import constants as C
from quantmill import progress
from quantmill.batches.batch import Run, groups
from quantmill.config import compose
from quantmill.errors import QuantmillError
from quantmill.toolchain import interrupts

# What this process's sweeps (``quantmill run -m hydra/launcher=prefect``) submitted, in order:
# {job, overrides, name, flow_run_id, state}; the Hydra launcher appends, the CLI reports.
SWEEP_SUBMISSIONS: list[dict[str, Any]] = []


def run_config(cfg, *, verbose: bool = False) -> list:
    """Run one composed config embedded; return its outcomes. Starts Prefect only if something must run."""
    from quantmill.backends.calibrated import prestarted

    # Embedded, the torch quantizers' processes import their libraries (10+ s) while the run plans, Prefect
    # starts and the earlier steps run; the plan then stops those no step needs.
    with prestarted(_torch_quantizers(cfg) if cfg.infra.mode != "prefect" else []) as ahead:
        return _run_config(cfg, ahead, verbose=verbose)


def _torch_quantizers(cfg) -> list:
    from quantmill.backends import QUANTIZERS

    quantizers = []
    for recipe in cfg.recipe.values():
        try:
            quantizers.append(QUANTIZERS.get(recipe.backend or recipe.method))
        except QuantmillError:
            pass  # the planner reports it, in its words
    return quantizers


def run_configs(cfgs: list, *, verbose: bool = False) -> list:
    """Several composed configs: for each, its outcomes or the QuantmillError that stopped it before a step ran.

    On pools (every config ``infra.mode=prefect``, one server) the configs that have steps to run go to the server
    as one parent flow run, their steps side by side on the pools' workers; otherwise each runs in turn. There the
    configs are planned in order until one has steps to run; the parent starts with it and plans each later one
    when nothing else waits, so the first step runs go out before the whole batch is planned."""
    from quantmill.errors import QuantmillError

    servers = {(c.infra.mode, c.infra.api_url) for c in cfgs}
    if len(cfgs) < 2 or len(servers) > 1 or cfgs[0].infra.mode != "prefect":
        results: list = []
        for cfg in cfgs:
            try:
                results.append(run_config(cfg, verbose=verbose))
            except QuantmillError as e:
                results.append(e)
        return results
    results: list = [None] * len(cfgs)
    stores: dict[bytes, Any] = {}  # each distinct store opened once for the batch: one client, records read once

    def made_for(i: int):
        """Config i's (cfg, store, plan, resolution) for the parent; or, with its result kept here, why it is not
        the parent's to run (every step cached, or refused in preflight)."""
        try:
            outcome = planned(cfgs[i], stores=stores)
        except QuantmillError as e:
            results[i] = e
            return f"refused: {e}"
        if isinstance(outcome, list):
            results[i] = outcome
            return "every step cached"
        return outcome

    first, made = next(((i, m) for i in range(len(cfgs)) for m in [made_for(i)] if not isinstance(m, str)),
                       (None, None))
    if first is None:
        return results
    checked = set(made[2].routes.values())  # pools _run_on_pools checks before the parent starts

    def later(i: int):
        def made_later():  # called by the parent when it comes to config i, while earlier configs' steps run
            m = made_for(i)
            new = sorted(set(m[2].routes.values()) - checked) if not isinstance(m, str) else []
            if new:
                try:
                    check_pools(new)
                except QuantmillError as e:
                    results[i] = e
                    return f"refused: {e}"
                checked.update(new)
            return m
        return made_later

    rest = range(first + 1, len(cfgs))
    for i, outcomes in zip(range(first, len(cfgs)),
                           _run_on_pools(cfgs[first:], [made, *map(later, rest)], verbose=verbose)):
        if outcomes is not None:
            results[i] = outcomes
    return results


def planned(cfg, ahead=None, stores: dict[bytes, Any] | None = None):
    """Plan ``cfg`` and ask the store: the outcomes when every step is cached, else (cfg, store, plan,
    resolution) for a run; preflight errors raise here, before anything runs. ``stores``: stores already open,
    by their config, shared by the configs of one batch."""
    from quantmill.backends import QUANTIZERS
    from quantmill.outcome import CACHED, Outcome
    from quantmill.plan.build import plan
    from quantmill.plan.spec import HIT, check_space, resolve
    from quantmill.store import LocalStore

    store = _open_store(cfg, stores)
    the_plan = plan(cfg, store)
    resolution = resolve(the_plan, store)
    if ahead is not None:
        ahead.expect(QUANTIZERS.get(s.backend) for s in the_plan
                     if s.step == C.QUANTIZE and resolution.status[s.id] != HIT)
    if resolution.all_cached:
        from quantmill.evaluation import report

        outcomes = [Outcome(s.id, s.step, s.recipe, CACHED, 0.0, resolution.keys[s.id],
                            resolution.refs[s.id].digest, store.read_result(resolution.refs[s.id]))
                    for s in the_plan]
        if isinstance(store, LocalStore):
            report.update_from_outcomes(store, cfg.model.name, outcomes)
        return outcomes
    check_space(the_plan, resolution, store)
    return cfg, store, the_plan, resolution


def _open_store(cfg, stores: dict[bytes, Any] | None):
    """The store of ``cfg``, from ``stores`` when one of the same config is open there.

    On S3, opening one makes a boto3 client and a store reads each committed record once, so the
    runs of a batch that share a store and its artifacts (the model's download) ask the bucket for them once."""
    import dataclasses

    from quantmill.digest import canonical_json
    from quantmill.store import open_store

    if stores is None:
        return open_store(cfg.store)
    key = canonical_json(dataclasses.asdict(cfg.store))
    if key not in stores:
        stores[key] = open_store(cfg.store)
    return stores[key]


def _run_config(cfg, ahead, *, verbose: bool) -> list:
    from quantmill.config import to_dict
    from quantmill.outcome import Outcome
    from quantmill.prefect import server, settings
    from quantmill.store import LocalStore
    from quantmill.store.check import remove_stale_staging

    made = planned(cfg, ahead)
    if isinstance(made, list):
        return made
    if isinstance(made[1], LocalStore):  # staging folders of steps killed mid-way, by runs that are gone
        remove_stale_staging(made[1])
    if cfg.infra.mode == "prefect":
        return _run_on_pools([cfg], [made], verbose=verbose)[0]
    settings.configure_embedded(cfg.infra, verbose=verbose)
    from prefect.task_runners import ThreadPoolTaskRunner

    from quantmill.prefect.deploy import flow_at
    from quantmill.prefect.scheduler import Planned

    flow = flow_at(C.PIPELINE_ENTRYPOINT).with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=max(1, cfg.infra.max_parallel)))
    settings.user_errors_in_one_line(verbose)
    with interrupts.guard(f"the run of model {cfg.model.name}"), server.temporary_server(cfg.infra), \
            progress.reporting(), settings.without_run_heartbeats(), settings.temporary_server_errors(cfg.infra):
        state = flow(to_dict(cfg), Planned(made), return_state=True)
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return [Outcome.from_json(d) for d in data]


def _run_on_pools(cfgs: list, made: list, *, verbose: bool) -> list[list | None]:
    """infra=prefect: this process runs the parent flow against the server (one for all of ``cfgs``); workers of
    each pool run the steps. ``made``: for each config, its (cfg, store, plan, resolution), or a function the
    parent calls when it comes to it (see ``scheduler.Planned``). Each config's outcomes, None for one that such a
    function said was not the parent's to run."""
    from quantmill.config import to_dict
    from quantmill.outcome import Outcome
    from quantmill.prefect import server, settings

    server.connect(cfgs[0].infra, verbose=verbose)
    check_pools(sorted({p for m in made if not callable(m) for p in m[2].routes.values()}))
    from prefect.task_runners import ThreadPoolTaskRunner

    from quantmill.prefect.deploy import flow_at
    from quantmill.prefect.scheduler import Planned

    settings.user_errors_in_one_line(verbose)
    single = len(cfgs) == 1
    threads = sum(max(1, cfg.infra.max_parallel) for cfg in cfgs)  # a dispatch holds a thread while it waits
    flow = flow_at(C.POOLS_ENTRYPOINT if single else C.BATCH_ENTRYPOINT).with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=threads))
    configs = [to_dict(cfg) for cfg in cfgs]
    # A busy server (SQLite, many runs starting at once) may refuse to create the run; a retry re-plans, and steps
    # that finished in a refused attempt are answered from the store.
    for attempt in range(5):
        # a retry's parent plans again what was planned here; a config's planning function is still the caller's
        handed = [Planned(m) if callable(m) or not attempt else None for m in made]
        try:
            with interrupts.guard(f"the run of {', '.join(c.model.name for c in cfgs[:3])}"
                                  f"{' and more' if len(cfgs) > 3 else ''} on pools"), \
                    settings.without_run_heartbeats():
                state = (flow(configs[0], handed[0], return_state=True) if single
                         else flow(configs, handed, return_state=True))
            break
        except Exception as e:  # noqa: BLE001 - only the server's "busy" answers are retried
            from quantmill.prefect.waiting import transient

            if attempt == 4 or not transient(e):
                raise
            time.sleep(2 * (attempt + 1))
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return [None if run is None else [Outcome.from_json(d) for d in run] for run in ([data] if single else data)]


def check_pools(pools: list[str]) -> None:
    """Refuse pools with no deployment on the server; warn, on stderr (stdout carries the report: `--json` must
    parse), of those with no worker online."""
    from quantmill.prefect import deploy

    for warning in deploy.check_deployments(pools):
        progress.warn(warning)


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
    from quantmill.prefect import deploy, server

    results = []
    connected = False
    for run in runs:
        cfg = compose([*run.compose_overrides(), *extra], conf_dir=conf_dir)
        if not connected:
            server.connect(cfg.infra, verbose=verbose)
            connected = True
        flow_run_id = deploy.submit_pipeline(cfg, name=run.id, pool=pool or cfg.infra.pipeline_pool,
                                             tags=[f"origin:{run.origin}", *tags])
        results.append(RunResult(run.id, True, flow_run_id=flow_run_id))
    return results
