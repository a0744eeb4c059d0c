"""The flow every pool runs: a segment of a plan (specs that share a pool), on the worker that picked it up.

Deployed once per pool as ``quantmill-step/<pool>``; the parent flow (``flows.pipeline.pipeline_on_pools``)
creates its runs. Inputs made elsewhere arrive as references and are fetched from the store by digest.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed, Failed

from quantmill import constants as C
from quantmill.config import StoreConfig
from quantmill.execute import StepResult
from quantmill.plan.spec import StepSpec
from quantmill.store.local import ArtifactRef
from tasks.steps import TASKS


@flow(name=C.STEP_FLOW, log_prints=False, validate_parameters=False, persist_result=False)
def step(specs: list[dict[str, Any]], inputs: dict[str, dict[str, str]], store: dict[str, Any]):
    """Run ``specs`` (in plan order) as tasks; ``inputs`` maps the id of each spec made elsewhere to its reference.

    Each task commits its artifact to the store; the parent reads results from there, not from this flow.
    """
    store_config = StoreConfig(**store)
    made_elsewhere = {sid: StepResult(sid, ArtifactRef(**ref), cached=True, seconds=0.0) for sid, ref in inputs.items()}
    futures: dict[str, Any] = {}
    for data in specs:
        spec = StepSpec(**data)
        upstream = {name: futures.get(sid) or made_elsewhere[sid] for name, sid in spec.inputs.items()}
        futures[spec.id] = TASKS[spec.step].submit(spec, upstream, store_config)
    failed = []
    for sid, future in futures.items():
        future.wait()
        if not future.state.is_completed():
            failed.append(sid)
    if failed:
        return Failed(message=f"{len(failed)} step(s) failed: {', '.join(failed)}")
    return Completed(message=f"{len(futures)} step(s) done")
