"""A warm worker: pool ``type: warm`` runs each flow run inside the worker's own, already started interpreter.

Prefect's process worker starts fresh interpreters for every flow run (a supervisor and the engine), so every step
run pays interpreter start, importing Prefect and quantmill and the engine's set-up before the first step function
starts. A warm worker claims runs from its pool like any Prefect worker (same API,
heartbeats, concurrency limit) and runs each in a thread of this process with the flow imported once.

What it gives up: a run's ``job_variables`` (environment, working directory) cannot differ from the worker's own,
and a run cannot be cancelled mid-step (a thread cannot be killed): stop the worker instead, which ends its steps'
tool and quantizer processes. Steps that must free their memory (GPU quantizers) already run in child processes of
their own.

A warm worker also keeps, per calibrated backend it has run, the next quantizer process waiting with torch and
the library imported (``infra.pools.NAME.keep_quantizers``, on by default): a GPU pool's second and later AWQ,
GPTQ or FP8 quantizations skip the 10-20 s of imports that a fresh process pays.

    python -m quantmill.prefect.warm_worker --pool cpu --name w1 [--limit N] [--keep-quantizers]
        (``quantmill worker`` starts it)
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

import anyio
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from quantmill import constants as C


class WarmWorkerResult(BaseWorkerResult):
    pass


@functools.lru_cache(maxsize=None)
def _flow(entrypoint: str):
    """The deployment's flow, imported once per worker."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def _execute(flow_run, entrypoint: str) -> int:
    from prefect.flow_engine import run_flow

    from quantmill.prefect.settings import without_run_heartbeats

    with without_run_heartbeats():  # the parent watches this worker's heartbeat instead
        state = run_flow(_flow(entrypoint), flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    return 0 if state.is_completed() else 1


class WarmWorker(BaseWorker[BaseJobConfiguration, BaseVariables, WarmWorkerResult]):
    type = C.WARM_POOL_TYPE
    job_configuration = BaseJobConfiguration
    job_configuration_variables = BaseVariables
    _description = "Runs quantmill flow runs in the worker's own interpreter (no process start per run)."
    _display_name = "quantmill warm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reads: _RememberedReads | None = None
        self._early_poll = False  # a poll asked for by an event or a run's end is under way
        self._asked = 0.0  # when this worker last asked the server for scheduled runs (time.monotonic)
        self._retried = 0.0  # when it last asked again at once after a run it claimed went to another worker
        self._listening = False  # subscribed to the server's events (runs scheduled on the pool are announced)

    @property
    def client(self):
        """Prefect's client, with deployment and flow reads remembered for a while: claiming a run reads its
        deployment twice and its flow once, the same few objects for every run of a pool."""
        client = BaseWorker.client.fget(self)
        if self._reads is None or self._reads.client is not client:
            self._reads = _RememberedReads(client)
        return self._reads

    async def run(self, flow_run, configuration: BaseJobConfiguration, task_status=None) -> WarmWorkerResult:
        deployment = await self.client.read_deployment(flow_run.deployment_id)
        if task_status is not None:
            task_status.started(os.getpid())
        IN_FLIGHT.add(flow_run.id)
        try:
            code = await anyio.to_thread.run_sync(_execute, flow_run, deployment.entrypoint)
        finally:
            IN_FLIGHT.discard(flow_run.id)
        return WarmWorkerResult(status_code=code, identifier=str(os.getpid()))

    async def _propose_submitting_state(self, flow_run) -> None:
        """Nothing: a run goes from Pending straight to Running. Prefect's Submitting state stands for the time a
        worker hands a run to its infrastructure; here the run starts in this process, and the transition was one
        more round trip to the server between a worker's claim and the run's start (the hand-over between two
        queued runs, bench/pools_load.py)."""

    async def _give_worker_labels_to_flow_run(self, flow_run_id) -> None:
        """Label the run with this worker (``workers.worker_of`` reads it) before it starts, as Prefect's workers do:
        given beside the start, the label could land after the run's own updates and be lost on a loaded server."""
        try:
            await super()._give_worker_labels_to_flow_run(flow_run_id)
        except Exception:  # noqa: BLE001 - the run goes on; its worker is then unknown to the parent's check
            self._logger.warning("could not label flow run %s with this worker", flow_run_id, exc_info=True)

    async def get_and_submit_flow_runs(self):
        """The regular poll, every ``--poll-seconds``: it asks the server for scheduled runs only where nothing
        else will. A worker busy at its ``--limit`` asks every ``BUSY_ASK_SECONDS`` (which keeps the pool's queue
        marked as polled): a freed slot asks at once anyway (``_release_limit_slot``). An idle worker hearing the
        event stream asks every ``LISTENING_ASK_SECONDS``: each run scheduled on the pool makes it ask at once,
        and the regular ask remains for runs scheduled ahead of their time and for a missed event. Frequent asks
        for runs a worker cannot take, or that no event announced, are a steady share of a small server's work."""
        since = time.monotonic() - self._asked
        busy = self._limiter is not None and self._limiter.available_tokens == 0
        if since < (BUSY_ASK_SECONDS if busy else LISTENING_ASK_SECONDS if self._listening else 0.0):
            self._last_polled_time = datetime.now(timezone.utc)  # alive (the worker's health check reads it)
            return []
        return await self._ask()

    async def _ask(self):
        self._asked = time.monotonic()
        return await super().get_and_submit_flow_runs()

    def _release_limit_slot(self, flow_run_id) -> None:
        """A slot freed: ask for the next run now, not at the next poll (a worker with ``--limit 1`` otherwise
        idles up to a poll interval between two queued runs). Freed by a run another worker claimed first (two
        idle workers told of one scheduled run both try to take it), ask again at once too, at most once a second,
        so that a run the server keeps refusing is not asked for in a loop."""
        super()._release_limit_slot(flow_run_id)
        if self._runs_task_group is None:
            return
        if flow_run_id in self._submitting_flow_run_ids:  # not started: another worker had claimed it
            if time.monotonic() - self._retried < 1.0:
                return
            self._retried = time.monotonic()
        self._runs_task_group.start_soon(self._poll_now)

    async def _poll_now(self) -> None:
        if self._early_poll:  # one at a time: on a busy SQLite server every poll is a write that may wait
            return
        self._early_poll = True
        try:
            await self._ask()
        except Exception:  # noqa: BLE001 - the regular poll asks again
            self._logger.debug("an early poll failed; the next regular poll asks again", exc_info=True)
        finally:
            self._early_poll = False

    async def listen_for_runs(self) -> None:
        """Poll as soon as the server announces a run scheduled on this pool, instead of at the next interval;
        without an event stream (a proxy that refuses websockets) the regular polls find it."""
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        scheduled = EventFilter(event=EventNameFilter(name=["prefect.flow-run.Scheduled"]))
        try:
            async with get_events_subscriber(filter=scheduled, reconnection_attempts=2) as events:
                self._listening = True
                async for event in events:
                    free = self._limiter is None or self._limiter.available_tokens > 0
                    if free and any(r.role == "work-pool" and r.name == self._work_pool_name for r in event.related):
                        await self._poll_now()
        except Exception:  # noqa: BLE001 - see the docstring
            self._logger.debug("no event stream; polling every interval only", exc_info=True)
        finally:
            self._listening = False


class _RememberedReads:
    """A client whose ``read_deployment`` and ``read_flow`` answers are kept for ``REMEMBER_SECONDS`` (in the
    process's memory of checks, ``server.CHECKS``); everything else goes to the client. A warm worker
    ignores job variables and imports each entrypoint once anyway."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    async def _remembered(self, what: str, key: Any):
        from quantmill.prefect.server import CHECKS

        hit, value = CHECKS.recent(("worker", what, key), ttl=REMEMBER_SECONDS)
        if not hit:
            value = await getattr(self.client, what)(key)
            CHECKS.remember(("worker", what, key), value)
        return value

    async def read_deployment(self, deployment_id):
        return await self._remembered("read_deployment", deployment_id)

    async def read_flow(self, flow_id):
        return await self._remembered("read_flow", flow_id)


REMEMBER_SECONDS = 60.0
STOP_SECONDS = 20.0  # Ctrl-C to exit, teardown and the flush of logs and events to the server included
BUSY_ASK_SECONDS = 30.0
LISTENING_ASK_SECONDS = 5.0


IN_FLIGHT: set = set()  # ids of the flow runs this worker is running now


def base_job_template() -> dict[str, Any]:
    return WarmWorker.get_default_base_job_template()


def arm_stop_deadline(seconds: float) -> None:
    """After Ctrl-C, give the worker ``seconds`` to tear down and flush its logs; past that, write where each of
    its threads is to stderr (the worker's log), stop its descendants and exit 1. A stop that waits on a server
    that no longer answers, or on a thread that does not end, is then visible and bounded, instead of lasting
    until someone sends SIGKILL."""

    def give_up() -> None:
        from quantmill.toolchain.interrupts import stop_descendants

        print(f"quantmill worker: still stopping {seconds:g} s after Ctrl-C; where each thread is:", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        stop_descendants()  # what its steps started goes with it, as with `quantmill run`'s Ctrl-C
        os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True  # it must not itself hold the interpreter's exit
    timer.start()


def end_runs_in_flight() -> None:
    """A run in flight cannot be cancelled in its thread, but its step's tool, quantizer or evaluation process
    can: stop them, so that the step fails at once, committing nothing (the store refuses while stopping), and
    the run's end reaches the server in the worker's teardown, instead of the stop waiting for the step."""
    from quantmill.toolchain.interrupts import begin_stopping, stop_descendants

    if not IN_FLIGHT:
        return
    print(f"quantmill worker: stopping with {len(IN_FLIGHT)} run(s) in flight; their steps are ended, finished "
          f"steps are kept in the store, run the pipeline again to resume", file=sys.stderr, flush=True)
    begin_stopping()
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # the steps fail now by the stop's doing: not news
        logging.getLogger(name).disabled = True
    # not in the signal handler itself: stopping waits up to a grace period for the processes to end
    threading.Thread(target=stop_descendants, name="end-runs-in-flight", daemon=True).start()


def take_ctrl_c() -> None:
    """SIGINT is how a worker is stopped, so it must reach Python's handler: a worker started in the background by
    a non-interactive shell (``quantmill worker ... &`` in a script, ``nohup``) inherits SIGINT ignored, and would
    otherwise outlive every Ctrl-C until killed."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _on_ctrl_c_arm_deadline() -> None:
    """Chain onto the event loop's own SIGINT handler (the first Ctrl-C cancels the serving, a second interrupts
    it): the first Ctrl-C also arms the stop deadline and ends the runs in flight."""
    previous = signal.getsignal(signal.SIGINT)
    armed = threading.Event()

    def on_sigint(signum, frame):
        if not armed.is_set():
            armed.set()
            arm_stop_deadline(STOP_SECONDS)
            end_runs_in_flight()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)


async def _serve(pool: str, name: str, limit: int | None, keep_quantizers: bool = False) -> None:
    from quantmill.backends import calibrated

    _on_ctrl_c_arm_deadline()
    if keep_quantizers:
        calibrated.keep_quantizers()
    # ``start`` sets the worker up and tears it down itself: entered here as well, its client and its runs' task
    # group were made twice, and Ctrl-C ended the worker with a traceback and exit code 1 (the outer task group's
    # scope exited from inside this one). Events heard before the set-up ask nothing: the first poll finds the runs.
    worker = WarmWorker(work_pool_name=pool, name=name, limit=limit)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(worker.listen_for_runs)
            await worker.start()
            group.cancel_scope.cancel()
    finally:
        calibrated.stop_kept()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantmill.prefect.warm_worker")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--keep-quantizers", action="store_true",
                        help="keep each calibrated backend's next process imported (infra.pools.NAME.keep_quantizers)")
    args = parser.parse_args(argv)
    take_ctrl_c()
    for entrypoint in (C.PIPELINE_ENTRYPOINT, C.STEP_ENTRYPOINT):  # imported before the first run, not during it
        _flow(entrypoint)

    try:
        anyio.run(_serve, args.pool, args.name, args.limit, args.keep_quantizers)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT) is how a worker is stopped: torn down by then, a clean exit
        pass


if __name__ == "__main__":
    main()
