"""Pools and deployments on the server, and the flow runs made of them: submitted pipelines and step runs.

Flows are named by entrypoint string (module path and function): workers import the installed package, and the
library never imports ``flows/``.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.config import InfraConfig, PoolConfig
from quantmill.errors import PreflightError
from quantmill.prefect.server import CHECKS
from quantmill.prefect.server import client as _client
from quantmill.prefect.settings import ServerError


@functools.cache
def flow_at(entrypoint: str):
    """The flow an entrypoint string names (``module.function``), imported once per process."""
    import importlib

    module, _, name = entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), name)


# -- pools and deployments -----------------------------------------------------------------------------------
def deploy(infra: InfraConfig, names: list[str] | None = None,
           watches: Mapping[str, tuple[str, str]] | None = None) -> list[str]:
    """Create (or update) each pool and its deployment ``quantmill-step/<pool>`` of the step flow; on the pipeline
    pool also ``quantmill-pipeline/<pool>`` (whole submitted runs) and ``quantmill-watch/<batch>`` for each batch
    of ``watches`` (batch -> (cron, timezone)), scheduled. Idempotent."""
    names = names or list(infra.pools) or [infra.pipeline_pool]
    made = []
    with _client() as client:
        for name in names:
            pool = infra.pools.get(name) or PoolConfig()
            made.append(_deployment(client, C.STEP_FLOW, name, name, C.STEP_ENTRYPOINT, pool.type, pool.job_variables,
                                    f"quantmill steps needing: {', '.join(pool.capabilities)}",
                                    ["quantmill", *pool.capabilities]))
        if infra.pipeline_pool in names:
            pool = infra.pools.get(infra.pipeline_pool) or PoolConfig()
            made.append(_deployment(client, C.PIPELINE_FLOW, infra.pipeline_pool, infra.pipeline_pool,
                                    C.PIPELINE_ENTRYPOINT, pool.type, pool.job_variables,
                                    "whole quantmill runs (batch --submit, hydra/launcher=prefect)", ["quantmill"]))
            for batch, (cron, timezone) in (watches or {}).items():
                made.append(_deployment(client, C.WATCH_FLOW, batch, infra.pipeline_pool, C.WATCH_ENTRYPOINT, pool.type,
                                        pool.job_variables, f"runs batch {batch} where its upstream changed",
                                        ["quantmill", "watch"], parameters={"batch": batch}, cron=(cron, timezone)))
    return made


def _deployment(client, flow: str, name: str, pool_name: str, entrypoint: str, pool_type: str,
                job_variables: Mapping[str, Any], description: str, tags: list[str], *,
                parameters: dict[str, Any] | None = None, cron: tuple[str, str] | None = None) -> str:
    from prefect.client.schemas.actions import DeploymentScheduleCreate, DeploymentUpdate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    prefect_type = prefect_pool_type(pool_type)
    template = {}
    if prefect_type == C.WARM_POOL_TYPE:
        from quantmill.prefect.warm_worker import base_job_template

        template = {"base_job_template": base_job_template()}
    try:
        client.create_work_pool(WorkPoolCreate(name=pool_name, type=prefect_type, **template))
    except ObjectAlreadyExists:
        existing_type = client.read_work_pool(pool_name).type
        if existing_type != prefect_type:
            raise ServerError(f"work pool {pool_name!r} exists on the server as type {existing_type!r}, the config says "
                              f"{pool_type!r}; delete it (`prefect work-pool delete {pool_name}`) or set "
                              f"infra.pools.{pool_name}.type to match") from None
    schedules = [DeploymentScheduleCreate(schedule=CronSchedule(cron=cron[0], timezone=cron[1]), active=True)] \
        if cron else []
    fields = dict(work_pool_name=pool_name, entrypoint=entrypoint, job_variables=dict(job_variables),
                  description=description, tags=tags, parameters=parameters or {})
    try:
        existing = client.read_deployment_by_name(f"{flow}/{name}")
    except ObjectNotFound:
        client.create_deployment(flow_id=client.create_flow_from_name(flow), name=name, pull_steps=[],
                                 enforce_parameter_schema=False, schedules=schedules, **fields)
    else:
        client.update_deployment(existing.id, DeploymentUpdate(**fields))
        if cron:
            for schedule in existing.schedules:
                client.delete_deployment_schedule(existing.id, schedule.id)
            client.create_deployment_schedules(existing.id, [(s.schedule, s.active) for s in schedules])
    return f"{flow}/{name}"


def submit_pipeline(cfg, *, name: str, pool: str, tags: list[str]) -> str:
    """Create a flow run of ``quantmill-pipeline/<pool>`` for one composed config; return its id (not waiting).

    Relative paths are made absolute first: the worker runs the flow in a directory of its own.
    """
    from prefect.exceptions import ObjectNotFound

    from quantmill.config import absolute_paths, to_dict

    with _client() as client:
        try:
            deployment = client.read_deployment_by_name(f"{C.PIPELINE_FLOW}/{pool}")
        except ObjectNotFound:
            raise ServerError(f"the server has no deployment {C.PIPELINE_FLOW}/{pool} for submitted runs; start a worker "
                              f"with `quantmill worker --pool {pool}` (it deploys it) or run `quantmill deploy`") from None
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": to_dict(absolute_paths(cfg))},
                                                     name=name, tags=["quantmill", *tags])
    return str(run.id)


def check_deployments(pools: list[str]) -> list[str]:
    """Refuse a run whose pools have no deployment; return a warning per pool with no worker online."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    key = ("deployments", str(get_current_settings().api.url), tuple(pools))
    seen, warnings = CHECKS.recent(key)
    if seen:
        return list(warnings)
    warnings = []
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                _read_step_deployment_id(client, pool)
            except ObjectNotFound:
                raise ServerError(f"the server has no deployment {C.STEP_FLOW}/{pool}; run `quantmill deploy "
                                  f"infra=prefect` (or start a worker for pool {pool!r}, which deploys it)") from None
            online = [w for w in client.read_workers_for_work_pool(pool) if str(w.status).upper().endswith("ONLINE")]
            if not online:
                warnings.append(f"pool {pool!r} has no worker online; its steps wait until one starts "
                                f"(`quantmill worker --pool {pool}`)")
    CHECKS.remember(key, warnings)
    return warnings


def create_step_run(pool: str, *, parameters: dict[str, Any], name: str, tags: list[str],
                    idempotency_key: str) -> str:
    """A run of the deployment ``quantmill-step/<pool>``; its id. Made from a flow run, it is a subflow of it, as
    ``run_deployment`` makes one (under a task run standing for it, beneath the task run dispatching it).

    Two API calls where ``run_deployment`` makes three (it reads the deployment by name every time), each
    0.1-0.3 s on a busy server when a batch starts. The deployment's id is the one ``check_deployments`` read;
    one deployed again since (a new id) is read again."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    with _CREATING, get_client(sync_client=True) as client:
        parent = _stand_in_task_run(client, f"{C.STEP_FLOW}/{pool}", idempotency_key)

        def create(deployment_id) -> str:
            return str(client.create_flow_run_from_deployment(
                deployment_id, parameters=parameters, state=Scheduled(), name=name, tags=tags,
                idempotency_key=idempotency_key, parent_task_run_id=parent).id)

        seen, deployment_id = CHECKS.recent(_step_deployment_key(pool), ttl=DEPLOYMENT_ID_SECONDS)
        if seen:
            try:
                return create(deployment_id)
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 404:  # no such deployment now: read its new id
                    raise
        return create(_read_step_deployment_id(client, pool))


# At most two step runs of this process in creation at once. A batch starts by sending its first queue_ahead runs
# together; on a server of few cores concurrent creations each take as long as the same creations in a row, so
# the two that workers take first would wait for the others.
_CREATING = threading.BoundedSemaphore(2)


def _step_deployment_key(pool: str) -> tuple:
    from prefect.settings import get_current_settings

    return ("step deployment", str(get_current_settings().api.url), pool)


def _read_step_deployment_id(client, pool: str):
    """The id of ``quantmill-step/<pool>`` read from the server (ObjectNotFound if none), remembered for
    ``create_step_run``."""
    deployment_id = client.read_deployment_by_name(f"{C.STEP_FLOW}/{pool}").id
    CHECKS.remember(_step_deployment_key(pool), deployment_id)
    return deployment_id


def _stand_in_task_run(client, deployment: str, key: str):
    """In a flow run, a task run of it standing for a subflow run of ``deployment`` (beneath the task run calling,
    if any); its id, else None. ``key`` tells apart the subflows of one flow run: a retry finds the same one."""
    from prefect.client.schemas import TaskRunResult
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.states import Pending
    from prefect.tasks import Task

    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    if flow_ctx is None or flow_ctx.flow_run is None:
        return None
    stand_in = Task(name=deployment, fn=lambda: None)
    stand_in.task_key = f"quantmill.step-run.{deployment}"
    inputs = {"__parents__": [TaskRunResult(id=task_ctx.task_run.id)]} if task_ctx else {}
    return client.create_task_run(task=stand_in, flow_run_id=flow_ctx.flow_run.id, dynamic_key=key,
                                  task_inputs=inputs, state=Pending()).id


DEPLOYMENT_ID_SECONDS = 600.0

POOL_TYPES = {"process": "process", "warm": C.WARM_POOL_TYPE}


def prefect_pool_type(pool_type: str) -> str:
    """The Prefect work-pool type of a configured pool type: ``process`` (a fresh process per step run) or ``warm``
    (runs in the worker's own interpreter, see ``quantmill.prefect.warm_worker``)."""
    if pool_type not in POOL_TYPES:
        raise PreflightError(f"pool type {pool_type!r} unknown; choose one of {', '.join(POOL_TYPES)} "
                             f"(infra.pools.NAME.type)")
    return POOL_TYPES[pool_type]

