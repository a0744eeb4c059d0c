"""A warm worker: pool ``type: warm`` runs each flow run inside the worker's own, already started interpreter.

Prefect's process worker starts fresh interpreters for every flow run (a supervisor and the engine), so every step
run pays interpreter start, importing Prefect and quantmill (about 1.5 s here) and the engine's set-up: about 3 s
before the first step function starts. A warm worker claims runs from its pool like any Prefect worker (same API,
heartbeats, concurrency limit) and runs each in a thread of this process with the flow imported once.

What it gives up: a run's ``job_variables`` (environment, working directory) cannot differ from the worker's own,
and a run cannot be cancelled mid-step (a thread cannot be killed): stop the worker instead. Steps that must free
their memory (GPU quantizers) already run in child processes of their own.

    python -m quantmill.warm_worker --pool cpu --name w1 [--limit N]   (``quantmill worker`` starts it)
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

import anyio
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from quantmill.runner import WARM_TYPE


class WarmWorkerResult(BaseWorkerResult):
    pass


@functools.lru_cache(maxsize=None)
def _flow(entrypoint: str):
    """The deployment's flow, imported once per worker."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def _execute(flow_run, entrypoint: str) -> int:
    from prefect.flow_engine import run_flow

    from quantmill.runner import without_run_heartbeats

    with without_run_heartbeats():  # the parent watches this worker's heartbeat instead
        state = run_flow(_flow(entrypoint), flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    return 0 if state.is_completed() else 1


class WarmWorker(BaseWorker[BaseJobConfiguration, BaseVariables, WarmWorkerResult]):
    type = WARM_TYPE
    job_configuration = BaseJobConfiguration
    job_configuration_variables = BaseVariables
    _description = "Runs quantmill flow runs in the worker's own interpreter (no process start per run)."
    _display_name = "quantmill warm"

    async def run(self, flow_run, configuration: BaseJobConfiguration, task_status=None) -> WarmWorkerResult:
        deployment = await self.client.read_deployment(flow_run.deployment_id)
        if task_status is not None:
            task_status.started(os.getpid())
        code = await anyio.to_thread.run_sync(_execute, flow_run, deployment.entrypoint)
        return WarmWorkerResult(status_code=code, identifier=str(os.getpid()))


def base_job_template() -> dict[str, Any]:
    return WarmWorker.get_default_base_job_template()


async def _serve(pool: str, name: str, limit: int | None) -> None:
    async with WarmWorker(work_pool_name=pool, name=name, limit=limit) as worker:
        await worker.start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantmill.warm_worker")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    import flows.pipeline  # noqa: F401
    import flows.step  # noqa: F401 - imported before the first run, not during it

    anyio.run(_serve, args.pool, args.name, args.limit)


if __name__ == "__main__":
    main()
