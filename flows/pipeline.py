"""The pipeline flows, a few lines each over ``quantmill.prefect.scheduler``.

``pipeline`` runs every step in this process (embedded); ``pipeline_on_pools`` sends them to work pools;
``pipelines_on_pools`` runs a batch's configs in one parent run. ``planned`` is what the caller planned just
before starting the flow (a deployment's run gets none and plans here).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from quantmill import constants as C
from quantmill.prefect import scheduler
from tasks.dispatch import dispatch
from tasks.steps import TASKS


@flow(name=C.PIPELINE_FLOW, log_prints=False, validate_parameters=False)
def pipeline(config: dict[str, Any], planned: scheduler.Planned | None = None):
    """Run one composed config (``quantmill.config.to_dict`` output) end to end.

    Returns a Completed state carrying one outcome per spec, or a Failed state carrying the same list when any
    step failed. This is also the flow of the ``quantmill-pipeline`` deployments that run submitted runs on a
    worker; a config with ``infra.mode=prefect`` then dispatches its steps to the pools.
    """
    if config["infra"]["mode"] == "prefect":  # a submitted run of a pools config: this run is the parent
        return scheduler.drive([config], [planned], dispatch)[0]
    return scheduler.run_embedded(config, planned, TASKS)


@flow(name=C.PIPELINE_FLOW, log_prints=False, validate_parameters=False)
def pipeline_on_pools(config: dict[str, Any], planned: scheduler.Planned | None = None):
    """``pipeline`` for infra=prefect: cached steps are answered from the store; the rest go, segment by segment,
    to the pools offering their capabilities, as soon as their inputs exist."""
    return scheduler.drive([config], [planned], dispatch)[0]


@flow(name=C.BATCH_FLOW, log_prints=False, validate_parameters=False)
def pipelines_on_pools(configs: list[dict[str, Any]], planned: list[scheduler.Planned | None] | None = None):
    """Several configs in one parent flow run (``quantmill batch`` on pools): one run to create and follow on the
    server instead of one per config, their steps dispatched side by side."""
    return scheduler.batch_state(scheduler.drive(configs, planned or [None] * len(configs), dispatch))
