"""Workers: what a machine must have to serve a pool, the command that starts it, and who ran what."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from quantmill import constants as C
from quantmill.config import PoolConfig, StoreConfig
from quantmill.errors import PreflightError
from quantmill.prefect.deploy import prefect_pool_type
from quantmill.store.provenance import RunInfo


@dataclass(frozen=True)
class WorkerPlan:
    command: list[str]
    env: dict[str, str]
    found: dict[str, str]  # capability -> what this machine has


def worker_plan(pools: Mapping[str, PoolConfig], pool: str, *, name: str, cache_dir: str | Path,
                poll_seconds: float = 1.0, heartbeat_seconds: float = 10.0, limit: int | None = None) -> WorkerPlan:
    """Check this machine against the pool's capabilities, then the ``prefect worker start`` to run.

    Raises:
        PreflightError: unknown pool, or a capability this machine lacks (one line, naming both).
    """
    from quantmill.plan.routing import describe_pools
    from quantmill.toolchain.hardware import check_capability

    if pool not in pools:
        raise PreflightError(f"pool {pool!r} is not configured; configured: {describe_pools(pools)} "
                             f"(conf/infra/prefect.yaml)")
    config = pools[pool]
    found = {}
    for capability in config.capabilities:
        try:
            found[capability] = check_capability(capability, min_gpu_memory_gb=config.min_gpu_memory_gb)
        except PreflightError as e:
            raise PreflightError(f"this machine cannot serve pool {pool!r}: {e}") from None
    env = {C.ENV_WORKER: name, C.ENV_POOL: pool, C.ENV_CACHE_DIR: str(Path(cache_dir).expanduser().resolve()),
           "PREFECT_WORKER_QUERY_SECONDS": f"{poll_seconds:g}", "PREFECT_WORKER_HEARTBEAT_SECONDS": f"{heartbeat_seconds:g}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if prefect_pool_type(config.type) == C.WARM_POOL_TYPE:
        command = [sys.executable, "-m", "quantmill.prefect.warm_worker", "--pool", pool, "--name", name,
                   *(["--keep-quantizers"] if config.keep_quantizers else [])]
    else:
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name,
                   "--type", config.type]
    if limit:
        command += ["--limit", str(limit)]
    return WorkerPlan(command, env, found)


def worker_store(store: StoreConfig) -> StoreConfig:
    """The store config as this worker uses it: its own local cache (set by ``quantmill worker``)."""
    import dataclasses

    cache = os.environ.get(C.ENV_CACHE_DIR)
    return dataclasses.replace(store, cache_dir=cache) if cache else store


def current_run() -> RunInfo:
    """The Prefect flow and task run ids of the caller, and its pool and worker when a pool worker runs it."""
    from prefect.runtime import flow_run, task_run

    pool = os.environ.get(C.ENV_POOL)
    return RunInfo(builder_id=C.BUILDER_ID_POOL if pool else C.BUILDER_ID_EMBEDDED,
                   flow_run_id=_id(flow_run.get_id()), task_run_id=_id(task_run.get_id()),
                   pool=pool, worker=os.environ.get(C.ENV_WORKER))


def worker_of(run) -> str | None:
    """The name of the worker that took ``run`` (a flow run read from the API), from the label every Prefect worker
    gives the runs it takes before starting them; None while no worker has."""
    return (run.labels or {}).get(C.WORKER_LABEL)


def _id(value) -> str | None:
    return str(value) if value else None

