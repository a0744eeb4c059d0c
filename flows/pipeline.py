"""The pipeline flow: plan the config, then submit each spec as its step's task, wired by references."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed, Failed

from quantmill import report
from quantmill.config import to_config
from quantmill.outcome import CACHED, FAILED, RAN, SKIPPED, Outcome
from quantmill.planner import StepSpec, open_store, plan
from quantmill.store import LocalStore
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
    step failed; what failed never stops unrelated recipes.
    """
    cfg = to_config(config)
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
    if isinstance(store, LocalStore):
        report.update_from_outcomes(store, cfg.model.name, outcomes)
    data = [o.to_json() for o in outcomes]
    failed = [o for o in outcomes if not o.ok]
    if failed:
        return Failed(message=f"{len(failed)} step(s) failed: {', '.join(o.spec_id for o in failed)}", data=data)
    return Completed(data=data)
