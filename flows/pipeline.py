"""The pipeline flows: plan the config, then run each spec as its step's task, wired by references.

``pipeline`` runs every task in this process (embedded); ``pipeline_on_pools`` sends them to work pools.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from quantmill import constants as C
from quantmill import provenance
from quantmill import report as report_mod
from quantmill.config import to_config
from quantmill.digest import canonical_json
from quantmill.execute import read_result
from quantmill.outcome import CACHED, FAILED, RAN, SKIPPED, Outcome
from quantmill.planner import StepSpec, open_store, plan, resolve, step_key
from quantmill.store import ArtifactRef, LocalStore
from tasks.steps import TASKS


def outcome_of(spec: StepSpec, state) -> Outcome:
    """Read a finished task's state into an Outcome (an upstream failure means this spec never ran)."""
    if state.is_completed():
        r = state.result()
        return Outcome(spec.id, spec.step, spec.recipe, CACHED if r.cached else RAN, round(r.seconds, 3),
                       r.ref.key, r.ref.digest, dict(r.result))
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - the task's own exception, reported in the summary
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        message = state.message or state.name
    upstream = "upstream" in (state.message or "").lower() or state.name in ("NotReady", "Pending")
    return Outcome(spec.id, spec.step, spec.recipe, SKIPPED if upstream else FAILED,
                   error=message if not upstream else "an input failed")


@flow(name="quantmill-pipeline", log_prints=False, validate_parameters=False)
def pipeline(config: dict[str, Any]):
    """Run one composed config (``quantmill.config.to_dict`` output) end to end.

    Returns a Completed state carrying one outcome per spec, or a Failed state carrying the same list when any
    step failed; what failed never stops unrelated recipes. This is also the flow of the ``quantmill-pipeline``
    deployments that run submitted runs on a worker; a config with ``infra.mode=prefect`` then dispatches its
    steps to the pools as ``pipeline_on_pools`` does.
    """
    cfg = to_config(config)
    if cfg.infra.mode == "prefect":  # a submitted run of a pools config: this run is the parent
        return pipeline_on_pools.fn(config)
    store = open_store(cfg)
    the_plan = plan(cfg, store)
    futures = {}
    for spec in the_plan:
        upstream = {name: futures[sid] for name, sid in spec.inputs.items()}
        futures[spec.id] = TASKS[spec.step].submit(spec, upstream, cfg.store)
    outcomes: list[Outcome] = []
    for spec in the_plan:
        future = futures[spec.id]
        future.wait()
        outcomes.append(outcome_of(spec, future.state))
    return finish(cfg, store, outcomes)


def finish(cfg, store, outcomes: list[Outcome]):
    """Update the model's validation report, then the run's final state carrying every outcome."""
    if isinstance(store, LocalStore):
        report_mod.update_from_outcomes(store, cfg.model.name, outcomes)
    data = [o.to_json() for o in outcomes]
    failed = [o for o in outcomes if not o.ok]
    if failed:
        return Failed(message=f"{len(failed)} step(s) failed: {', '.join(o.spec_id for o in failed)}", data=data)
    return Completed(data=data)


# -- infra=prefect: the same plan, each segment of same-pool steps sent to its pool's deployment ----------------
@task(name="dispatch", task_run_name="{pool}: {label}", cache_policy=NO_CACHE, persist_result=False, retries=3,
      retry_delay_seconds=3)
def dispatch(pool: str, label: str, specs: list[dict[str, Any]], inputs: dict[str, dict[str, str]],
             store: dict[str, Any], poll_seconds: float) -> str:
    """Run a segment on ``pool`` as a run of its deployment (a subflow of this run); return that run's id."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    from quantmill.runner import wait_for_run

    # A retry (the server was busy) finds the step run made by the first attempt instead of making a second one.
    run = run_deployment(f"{C.STEP_FLOW}/{pool}", parameters={"specs": specs, "inputs": inputs, "store": store},
                         flow_run_name=label, timeout=0, tags=["quantmill", f"pool:{pool}"],
                         idempotency_key=f"{flow_run.get_id()}:{specs[0]['id']}")
    wait_for_run(str(run.id), poll_seconds=poll_seconds)
    return str(run.id)


def collect(segment: list[StepSpec], run_id: str | None, failure: str | None, store,
            refs: dict[str, ArtifactRef]) -> list[Outcome]:
    """Each spec's outcome: from the store when its artifact is there (ran, or made first by a concurrent run),
    otherwise from the API (its task run's error, or how the step run ended)."""
    from quantmill.runner import flow_run_report

    outcomes, missing = [], []
    for spec in segment:  # plan order: inputs inside the segment are resolved first
        ref = None
        if all(sid in refs for sid in spec.inputs.values()):
            ref = store.lookup(step_key(spec, {name: refs[sid] for name, sid in spec.inputs.items()}))
        if ref is None:
            missing.append(spec)
            continue
        refs[spec.id] = ref
        statement = store.statement(ref.key)
        made_here = run_id is not None and provenance.run_of(statement).get("prefect_flow_run_id") == run_id
        outcomes.append(Outcome(spec.id, spec.step, spec.recipe, RAN if made_here else CACHED,
                                round(provenance.seconds_of(statement), 3) if made_here else 0.0,
                                ref.key, ref.digest, read_result(store, ref)))
    if not missing:
        return outcomes
    lost = {s.id for s in missing}
    skipped = {s.id for s in missing if lost & set(s.inputs.values())}  # never started: an input failed
    report = flow_run_report(run_id, wait_for=sorted(lost - skipped)) if run_id else None
    for spec in missing:
        task_run = report["tasks"].get(spec.id) if report else None
        if spec.id in skipped:
            outcomes.append(Outcome(spec.id, spec.step, spec.recipe, SKIPPED, error="an input failed"))
        elif task_run and task_run["state"] in ("FAILED", "CRASHED"):
            message = (task_run["message"] or "").removeprefix("Task run encountered an exception ")
            upstream = "upstream" in message.lower() or "NotReady" in message
            outcomes.append(Outcome(spec.id, spec.step, spec.recipe, SKIPPED if upstream else FAILED,
                                    error="an input failed" if upstream else message.splitlines()[0]))
        elif report:
            where = f"pool {report['pool']}" + (f", worker {report['worker']}" if report["worker"] else "")
            outcomes.append(Outcome(spec.id, spec.step, spec.recipe, FAILED,
                                    error=f"step run {report['name']} ({where}) ended {report['state']}: "
                                          f"{report['message'] or 'no artifact committed'}"))
        else:
            outcomes.append(Outcome(spec.id, spec.step, spec.recipe, FAILED, error=failure or "dispatch failed"))
    return outcomes


# What the caller in this process planned for a config just before starting its parent flow, used once by that
# flow instead of planning again (a plan reads every source and asks the store about every step: the second plan
# was about an eighth of a parent's Python with many parents in one process).
_HANDED_OVER: dict[bytes, tuple[Any, Any, Any]] = {}


@contextmanager
def handed_over(config: dict[str, Any], store, the_plan, resolution) -> Iterator[None]:
    """While inside, a ``pipeline_on_pools`` run of ``config`` takes this plan (once) instead of planning."""
    key = canonical_json(config)
    _HANDED_OVER[key] = (store, the_plan, resolution)
    try:
        yield
    finally:
        _HANDED_OVER.pop(key, None)  # not taken (the run was refused before it started): a retry plans again


@flow(name=C.PIPELINE_FLOW, log_prints=False, validate_parameters=False)
def pipeline_on_pools(config: dict[str, Any]):
    """``pipeline`` for infra=prefect: cached steps are answered from the store; the rest go, segment by segment,
    to the pools offering their capabilities, as soon as their inputs exist."""
    from prefect.futures import as_completed

    from quantmill.pools import next_segments

    cfg = to_config(config)
    handed = _HANDED_OVER.pop(canonical_json(config), None)
    if handed is not None:
        store, the_plan, resolution = handed
    else:
        store = open_store(cfg)
        the_plan = plan(cfg, store)
        resolution = resolve(the_plan, store)
    routes = the_plan.routes
    specs = list(the_plan)
    refs = dict(resolution.refs)
    outcomes: dict[str, Outcome] = {
        sid: Outcome(sid, s.step, s.recipe, CACHED, 0.0, refs[sid].key, refs[sid].digest, read_result(store, refs[sid]))
        for sid, s in the_plan.specs.items() if sid in refs}
    started: set[str] = set()
    in_flight: dict[Any, list[StepSpec]] = {}
    store_json = dataclasses.asdict(cfg.store)
    while True:
        for segment in next_segments(specs, routes, set(refs), started):
            ids = {s.id for s in segment}
            inputs = {sid: refs[sid].to_json() for s in segment for sid in s.inputs.values() if sid not in ids}
            pool = routes[segment[0].id]
            label = segment[0].id + (f" +{len(segment) - 1}" if len(segment) > 1 else "")
            future = dispatch.submit(pool, label, [dataclasses.asdict(s) for s in segment], inputs, store_json,
                                     cfg.infra.poll_seconds)
            in_flight[future] = segment
            started |= ids
        if not in_flight:
            break
        future = next(as_completed(list(in_flight)))
        segment = in_flight.pop(future)
        run_id, failure = None, None
        try:
            run_id = future.result()
        except Exception as e:  # noqa: BLE001 - reported per spec of the segment
            failure = f"dispatch to pool {routes[segment[0].id]} failed: {str(e).splitlines()[0] if str(e) else e!r}"
        for outcome in collect(segment, run_id, failure, store, refs):
            outcomes[outcome.spec_id] = outcome
    for spec in specs:  # never dispatched: an input failed
        outcomes.setdefault(spec.id, Outcome(spec.id, spec.step, spec.recipe, SKIPPED, error="an input failed"))
    return finish(cfg, store, [outcomes[s.id] for s in specs])
