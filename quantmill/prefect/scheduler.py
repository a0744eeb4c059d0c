"""How a pipeline's steps are run as Prefect tasks: embedded (every task in this process) or on pools (each segment
of same-pool steps sent as a step run of its pool's deployment, as soon as its inputs exist).

The flows in ``flows/`` are a few lines over these functions; the tasks they run are handed in (``tasks/``), so
this library module never imports them. What a caller planned before starting a flow reaches it as a parameter
(``Planned``), never through module state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from prefect.states import Completed, Failed

from quantmill.config import to_config
from quantmill.evaluation import report as report_mod
from quantmill.outcome import CACHED, FAILED, RAN, SKIPPED, Outcome
from quantmill.plan.build import plan
from quantmill.plan.routing import next_segments
from quantmill.plan.spec import StepSpec, resolve, step_key
from quantmill.store import open_store, provenance
from quantmill.store.local import ArtifactRef, LocalStore


class Planned:
    """What the caller planned for a config just before starting its flow, handed to the flow as a parameter so
    the flow does not plan again (a plan reads every source and asks the store about every step).

    ``made`` is (cfg, store, plan, resolution), or a function the flow calls when it comes to the config (a batch's
    later configs are planned while the first ones' steps already run) that returns the same, or a string saying
    why the config is not the flow's to run (every step cached, or refused in preflight). Prefect records a
    parameter it cannot serialize as a placeholder: this class has no fields it could read.
    """

    __slots__ = ("made",)

    def __init__(self, made: Any):
        self.made = made


def planned_or_plan(config: dict[str, Any], planned: Planned | None) -> tuple[Any, Any, Any, Any] | str:
    """The config, store, plan and resolution of a run: those handed over by the caller, else made here; or why
    the caller says the config is not this flow's to run."""
    if planned is not None:
        return planned.made() if callable(planned.made) else planned.made
    cfg = to_config(config)
    store = open_store(cfg.store)
    the_plan = plan(cfg, store)
    return cfg, store, the_plan, resolve(the_plan, store)


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


def run_embedded(config: dict[str, Any], planned: Planned | None, tasks: Mapping[str, Any]):
    """Every spec of the config as its step's task (``tasks``: step -> Prefect task) in this flow run, wired by
    references; the run's final state carries one outcome per spec. What failed never stops unrelated recipes."""
    cfg, store, the_plan, _ = planned_or_plan(config, planned)
    futures = {}
    for spec in the_plan:
        upstream = {name: futures[sid] for name, sid in spec.inputs.items()}
        futures[spec.id] = tasks[spec.step].submit(spec, upstream, cfg.store)
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


def dispatch_segment(pool: str, label: str, specs: list[dict[str, Any]], inputs: dict[str, dict[str, str]],
                     store: dict[str, Any], poll_seconds: float, run_key: str = "",
                     notify: Callable[[str], None] | None = None) -> str:
    """Run a segment on ``pool`` as a run of its deployment (a subflow of the calling run); return that run's id.
    ``run_key`` tells apart the configs of one parent, whose spec ids may be the same; ``notify`` is told
    "created" when the server has made the run and "claimed" when a worker takes it."""
    from prefect.runtime import flow_run

    from quantmill.prefect.deploy import create_step_run
    from quantmill.prefect.waiting import wait_for_run

    # A retry (the server was busy) finds the step run made by the first attempt instead of making a second one.
    run_id = create_step_run(pool, parameters={"specs": specs, "inputs": inputs, "store": store}, name=label,
                             tags=["quantmill", f"pool:{pool}"],
                             idempotency_key=f"{flow_run.get_id()}:{run_key}{specs[0]['id']}")
    if notify:
        notify("created")
    wait_for_run(run_id, poll_seconds=poll_seconds, on_start=(lambda: notify("claimed")) if notify else None)
    return run_id


def collect(segment: list[StepSpec], run_id: str | None, failure: str | None, store,
            refs: dict[str, ArtifactRef]) -> list[Outcome]:
    """Each spec's outcome: from the store when its artifact is there (ran, or made first by a concurrent run),
    otherwise from the API (its task run's error, or how the step run ended)."""
    from quantmill.prefect.waiting import flow_run_report

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
                                ref.key, ref.digest, store.read_result(ref)))
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


class DrivenRun:
    """One config inside a parent flow: what is done, what was sent where, and each spec's outcome."""

    def __init__(self, index: int, dispatch, cfg, store, the_plan, resolution):
        self.dispatch = dispatch  # the Prefect task that sends a segment (dispatch_segment)
        self.cfg, self.store, self.specs, self.routes = cfg, store, list(the_plan), the_plan.routes
        self.run_key = f"{index}:" if index else ""
        self.refs = dict(resolution.refs)
        self.outcomes: dict[str, Outcome] = {
            sid: Outcome(sid, s.step, s.recipe, CACHED, 0.0, self.refs[sid].key, self.refs[sid].digest,
                         store.read_result(self.refs[sid]))
            for sid, s in the_plan.specs.items() if sid in self.refs}
        self.started: set[str] = set()
        self.store_json = dataclasses.asdict(cfg.store)

    def ready(self) -> list[tuple[str, list[StepSpec]]]:
        """Every segment whose inputs now exist and that was not taken before, with its pool."""
        segments = next_segments(self.specs, self.routes, set(self.refs), self.started)
        for segment in segments:
            self.started |= {s.id for s in segment}
        return [(self.routes[segment[0].id], segment) for segment in segments]

    def send(self, pool: str, segment: list[StepSpec], notify: Callable[[str], None]):
        """Dispatch ``segment`` to ``pool``; the future of its dispatch task."""
        ids = {s.id for s in segment}
        inputs = {sid: self.refs[sid].to_json() for s in segment for sid in s.inputs.values() if sid not in ids}
        label = segment[0].id + (f" +{len(segment) - 1}" if len(segment) > 1 else "")
        return self.dispatch.submit(pool, label, [dataclasses.asdict(s) for s in segment], inputs, self.store_json,
                                    self.cfg.infra.poll_seconds, self.run_key, notify)

    def ended(self, future, segment: list[StepSpec]) -> None:
        run_id, failure = None, None
        try:
            run_id = future.result()
        except Exception as e:  # noqa: BLE001 - reported per spec of the segment
            failure = (f"dispatch to pool {self.routes[segment[0].id]} failed: "
                       f"{str(e).splitlines()[0] if str(e) else repr(e)}")
        for outcome in collect(segment, run_id, failure, self.store, self.refs):
            self.outcomes[outcome.spec_id] = outcome

    def finish(self):
        for spec in self.specs:  # never dispatched: an input failed
            self.outcomes.setdefault(spec.id, Outcome(spec.id, spec.step, spec.recipe, SKIPPED,
                                                      error="an input failed"))
        return finish(self.cfg, self.store, [self.outcomes[s.id] for s in self.specs])


def drive(configs: list[dict[str, Any]], planned: list[Planned | None], dispatch) -> list:
    """Run the configs' steps on their pools (each segment through the ``dispatch`` task, see ``dispatch_segment``),
    each segment as soon as its inputs exist; each config's final state,
    made (and logged, when several share the parent) as soon as its last segment has ended.

    Per pool, at most ``infra.queue_ahead`` of this parent's step runs wait on the server for a worker (0: no
    bound); the other ready segments wait here, first come first served, and each goes when a worker takes one
    of those. Workers then always find the next run waiting, and the server creates a few runs at a time instead
    of a batch's all at once (50 at once on SQLite were spread over three minutes of retried 'database is
    locked' answers, bench/pools_load.py).

    A batch's configs are planned one at a time when nothing else is to be done, and not while a step run is
    being made on the server with a planned segment already waiting for a place: the first step runs of a batch
    are made while this process leaves the CPU to the server (on a small machine the two share it), and each
    later one, when a worker takes an earlier one, finds a planned segment ready.
    """
    import queue
    from collections import deque

    from prefect import get_run_logger
    from prefect.runtime import flow_run

    runs: list[DrivenRun | None] = [None] * len(configs)
    unplanned = deque(range(len(configs)))  # planned one at a time, while nothing else is to be done
    ahead: int | None = None  # the batch's infra.queue_ahead, from its first config planned
    states: list[Any] = [None] * len(runs)  # None: not this parent's to run (see Planned)
    events: queue.Queue = queue.Queue()  # ("claimed" | "ended", token, future), from the waiter and the tasks
    waiting: dict[str, deque] = {}  # pool -> (run index, segment) not yet sent
    unclaimed: dict[str, int] = {}  # pool -> sent runs no worker has taken yet
    in_flight: dict[str, tuple[int, str, list[StepSpec]]] = {}  # token -> (run index, pool, segment)
    claimed: set[str] = set()
    creating: set[str] = set()  # sent, the server not yet done making their step runs
    parent = flow_run.get_id() or ""

    def release(pool: str) -> None:
        while waiting.get(pool) and (not ahead or unclaimed.get(pool, 0) < ahead):
            i, segment = waiting[pool].popleft()
            token = f"{parent}:{i}:{segment[0].id}"
            creating.add(token)
            in_flight[token] = (i, pool, segment)
            unclaimed[pool] = unclaimed.get(pool, 0) + 1
            runs[i].send(pool, segment, lambda kind, token=token: events.put((kind, token, None))).add_done_callback(
                lambda future, token=token: events.put(("ended", token, future)))

    def advance(i: int) -> None:
        for pool, segment in runs[i].ready():
            waiting.setdefault(pool, deque()).append((i, segment))
            release(pool)
        if not any(j == i for j, _, _ in in_flight.values()) and not any(
                j == i for queued in waiting.values() for j, _ in queued):
            states[i] = runs[i].finish()
            if len(runs) > 1:
                get_run_logger().info("%s: %s", runs[i].cfg.model.name, states[i].message or "completed")

    def take(token: str, pool: str) -> None:  # a worker took it (or it ended untaken): the next may go
        if token not in claimed:
            claimed.add(token)
            unclaimed[pool] -= 1
            release(pool)

    def plan_next() -> None:
        nonlocal ahead
        i = unplanned.popleft()
        made = planned_or_plan(configs[i], planned[i])
        if isinstance(made, str):
            if len(configs) > 1:
                get_run_logger().info("%s: %s", configs[i]["model"]["name"], made)
        else:
            runs[i] = DrivenRun(i, dispatch, *made)
            ahead = runs[i].cfg.infra.queue_ahead if ahead is None else ahead
            advance(i)

    while in_flight or unplanned:  # a config is planned when no event waits: the first step runs go first
        may_plan = unplanned and not (creating and any(waiting.values()))
        try:
            kind, token, future = events.get_nowait() if may_plan else events.get()
        except queue.Empty:
            plan_next()
            continue
        if kind == "created":
            creating.discard(token)
            continue
        if token not in in_flight:
            continue  # claimed after it ended
        i, pool, segment = in_flight[token]
        if kind == "claimed":
            take(token, pool)
            continue
        del in_flight[token]
        creating.discard(token)  # a dispatch that failed before its step run was made
        take(token, pool)
        claimed.discard(token)
        runs[i].ended(future, segment)
        advance(i)
    return states




def batch_state(states: list) -> Any:
    """The final state of a parent run of several configs: each config's outcomes (None for one that was not this
    run's), failed after every config has ended when a step of any of them failed."""
    data = [None if state is None else state.data for state in states]
    failed = [i for i, state in enumerate(states) if state is not None and state.is_failed()]
    if failed:
        return Failed(message=f"{len(failed)} of {sum(s is not None for s in states)} runs had failed steps: "
                              + "; ".join(states[i].message for i in failed), data=data)
    return Completed(data=data)
