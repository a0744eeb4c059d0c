"""The library's one contact with Prefect: process settings, the server and its pools, and run ids for provenance.

Embedded runs need nothing here but settings. With ``infra.mode=prefect`` this module checks the server, creates
each pool's deployment of the step flow, starts workers after checking their machine, and reads back from the
API what ran where.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from quantmill import constants as C
from quantmill.config import InfraConfig, PoolConfig, StoreConfig
from quantmill.errors import PreflightError, QuantmillError
from quantmill.store.provenance import RunInfo

STEP_ENTRYPOINT = "flows.step.step"  # module paths: workers import the installed package, no code pull
PIPELINE_ENTRYPOINT = "flows.pipeline.pipeline"
WATCH_ENTRYPOINT = "flows.watch.watch"


class ServerError(QuantmillError):
    """The Prefect server cannot be reached or lacks what a pools run needs."""


def configure_embedded(infra: InfraConfig, *, verbose: bool = False) -> None:
    """Settings for an embedded run (the flow runs in this process), applied before Prefect is imported.

    A project-local PREFECT_HOME keeps runs of different projects apart; telemetry is off (offline machines
    log lock errors from it). Without PREFECT_API_URL Prefect starts a temporary API server for the run
    (about 6 s, 11 s on a fresh PREFECT_HOME); with PREFECT_API_URL pointing at a running server, the run is
    recorded there and that start-up is skipped.
    """
    home = Path(infra.prefect_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)
    _quiet(verbose)


# Prefect waits 20 s for its temporary API server by default, counting only its own 0.1 s sleeps; on a fresh
# PREFECT_HOME the server first migrates its SQLite database, and on a loaded 2-core machine (CI) that start took
# longer than 20 s. A user's own setting wins.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def prefect_defaults() -> None:
    """Settings read once when Prefect is imported: set them before that (Prefect freezes them at import)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)


def _quiet(verbose: bool) -> None:
    prefect_defaults()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")


@contextmanager
def temporary_server_errors(infra: InfraConfig) -> Iterator[None]:
    """Prefect's temporary API server that does not start becomes one line that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        raise ServerError(
            f"Prefect's temporary API server (PREFECT_HOME {Path(infra.prefect_home).expanduser().resolve()}) did not "
            f"answer within {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s; raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with `quantmill server` and set "
            "PREFECT_API_URL") from None


@contextmanager
def without_run_heartbeats() -> Iterator[None]:
    """Flow runs started inside send no flow-run heartbeats.

    Prefect 3.8 sends one every 180 s from a thread that takes up to 1 s to stop when the run ends (half a second
    of every run, measured). Liveness is checked otherwise here: a step run's by its worker's heartbeat
    (``wait_for_run``); an embedded or parent run is the process that started it.
    """
    import prefect.context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    # What ``temporary_settings`` does, with the settings copy made once per base settings: each copy builds
    # Prefect's whole settings model again (31 ms of Python here, twice per parent run on pools).
    context = prefect.context.get_settings_context()
    with _NO_HEARTBEATS_LOCK:
        base, quiet = _NO_HEARTBEATS.get(id(context.settings), (None, None))
        if base is not context.settings:
            quiet = context.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            if len(_NO_HEARTBEATS) >= 8:
                _NO_HEARTBEATS.clear()
            _NO_HEARTBEATS[id(context.settings)] = (context.settings, quiet)  # holding the base keeps its id unique
    with prefect.context.SettingsContext(profile=context.profile, settings=quiet):
        yield


_NO_HEARTBEATS: dict[int, tuple[Any, Any]] = {}
_NO_HEARTBEATS_LOCK = threading.Lock()


# -- the server --------------------------------------------------------------------------------------------
def api_url(infra: InfraConfig) -> str:
    url = infra.api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        raise ServerError("infra.mode=prefect needs a Prefect server: set infra.api_url or PREFECT_API_URL (start one "
                          "with `quantmill server`), or run embedded with infra=embedded")
    return url.rstrip("/")


def check_server(url: str) -> None:
    """One line if the server does not answer, naming it and the way to run without one."""
    import httpx

    try:
        httpx.get(f"{url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        reason = type(e).__name__ if not str(e) else str(e).splitlines()[0]
        raise ServerError(f"Prefect server at {url} is unreachable ({reason}); start it with `quantmill server`, fix "
                          f"infra.api_url / PREFECT_API_URL, or run embedded with infra=embedded") from None


# A process that starts many runs (a batch, the Hydra launcher, parents in threads) checks the server and its
# deployments once per this many seconds, not once per run (each check is a new HTTP client and a request).
CHECK_TTL_SECONDS = 10.0
_CHECKED: dict[Any, tuple[float, Any]] = {}


def _recent_check(key: Any, ttl: float = CHECK_TTL_SECONDS) -> tuple[bool, Any]:
    """(True, what was remembered) when ``key`` was remembered less than ``ttl`` seconds ago, else (False, None)."""
    import time

    hit = _CHECKED.get(key)
    return (True, hit[1]) if hit and time.monotonic() - hit[0] < ttl else (False, None)


def _remember_check(key: Any, value: Any = None) -> None:
    import time

    _CHECKED[key] = (time.monotonic(), value)


def connect(infra: InfraConfig, *, verbose: bool = False) -> str:
    """Point this process's Prefect client at the configured server (before Prefect is imported) and check it."""
    url = api_url(infra)
    if not _recent_check(("server", url))[0]:
        check_server(url)
        _remember_check(("server", url))
    os.environ["PREFECT_API_URL"] = url
    _quiet(verbose)
    return url


def server_command(*, host: str, port: int, database_url: str | None) -> tuple[list[str], dict[str, str]]:
    """``prefect server start`` with SQLite under PREFECT_HOME by default, PostgreSQL (or any URL) if given."""
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED",
                                                                                                "true")}
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env


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
            made.append(_deployment(client, C.STEP_FLOW, name, name, STEP_ENTRYPOINT, pool.type, pool.job_variables,
                                    f"quantmill steps needing: {', '.join(pool.capabilities)}",
                                    ["quantmill", *pool.capabilities]))
        if infra.pipeline_pool in names:
            pool = infra.pools.get(infra.pipeline_pool) or PoolConfig()
            made.append(_deployment(client, C.PIPELINE_FLOW, infra.pipeline_pool, infra.pipeline_pool,
                                    PIPELINE_ENTRYPOINT, pool.type, pool.job_variables,
                                    "whole quantmill runs (batch --submit, hydra/launcher=prefect)", ["quantmill"]))
            for batch, (cron, timezone) in (watches or {}).items():
                made.append(_deployment(client, C.WATCH_FLOW, batch, infra.pipeline_pool, WATCH_ENTRYPOINT, pool.type,
                                        pool.job_variables, f"runs batch {batch} where its upstream changed",
                                        ["quantmill", "watch"], parameters={"batch": batch}, cron=(cron, timezone)))
    return made


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _deployment(client, flow: str, name: str, pool_name: str, entrypoint: str, pool_type: str,
                job_variables: Mapping[str, Any], description: str, tags: list[str], *,
                parameters: dict[str, Any] | None = None, cron: tuple[str, str] | None = None) -> str:
    from prefect.client.schemas.actions import DeploymentScheduleCreate, DeploymentUpdate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    prefect_type = prefect_pool_type(pool_type)
    template = {}
    if prefect_type == WARM_TYPE:
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
    seen, warnings = _recent_check(key)
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
    _remember_check(key, warnings)
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

        seen, deployment_id = _recent_check(_step_deployment_key(pool), ttl=DEPLOYMENT_ID_SECONDS)
        if seen:
            try:
                return create(deployment_id)
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 404:  # no such deployment now: read its new id
                    raise
        return create(_read_step_deployment_id(client, pool))


# At most two step runs of this process in creation at once. A batch starts by sending its first queue_ahead runs
# together; on a server of few cores four creations at once took as long each as four in a row (0.4-0.8 s against
# 0.26-0.44 s alone), so the two that workers take first waited for the other two.
_CREATING = threading.BoundedSemaphore(2)


def _step_deployment_key(pool: str) -> tuple:
    from prefect.settings import get_current_settings

    return ("step deployment", str(get_current_settings().api.url), pool)


def _read_step_deployment_id(client, pool: str):
    """The id of ``quantmill-step/<pool>`` read from the server (ObjectNotFound if none), remembered for
    ``create_step_run``."""
    deployment_id = client.read_deployment_by_name(f"{C.STEP_FLOW}/{pool}").id
    _remember_check(_step_deployment_key(pool), deployment_id)
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


# -- workers -------------------------------------------------------------------------------------------------
WARM_TYPE = "quantmill-warm"  # the Prefect pool type of `type: warm` (quantmill.prefect.warm_worker)
POOL_TYPES = {"process": "process", "warm": WARM_TYPE}


def prefect_pool_type(pool_type: str) -> str:
    """The Prefect work-pool type of a configured pool type: ``process`` (a fresh process per step run) or ``warm``
    (runs in the worker's own interpreter, see ``quantmill.prefect.warm_worker``)."""
    if pool_type not in POOL_TYPES:
        raise PreflightError(f"pool type {pool_type!r} unknown; choose one of {', '.join(POOL_TYPES)} "
                             f"(infra.pools.NAME.type)")
    return POOL_TYPES[pool_type]


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
    from quantmill.toolchain.hardware import check_capability
    from quantmill.plan.routing import describe_pools

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
    if prefect_pool_type(config.type) == WARM_TYPE:
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


# -- waiting for dispatched step runs -------------------------------------------------------------------------
STALE_HEARTBEATS = 3  # a worker silent for this many heartbeat intervals is taken as gone ...
STALE_FLOOR_SECONDS = 20.0  # ... and for at least this long: a starved machine delays heartbeats by seconds
HEARTBEAT_CHECK_SECONDS = 5.0  # how often running runs' workers are checked
API_PAGE = 200  # the most runs the API returns for one read
RUNNING_EVENT = "prefect.flow-run.Running"


def wait_for_run(flow_run_id: str, *, poll_seconds: float, on_start: Callable[[], None] | None = None) -> str:
    """Wait for a dispatched flow run to end; return its final state type. ``on_start`` is called once, from the
    waiter's thread, when the run is seen taken by a worker (no longer scheduled or pending) or, at the latest, ended.

    Every wait of this process goes through one ``RunWaiter`` per server (see there): the end is heard as it
    happens from the server's event stream, and the API is read every ``poll_seconds`` for all runs at once, which
    covers a stream that cannot be reached and checks the workers: a worker killed mid-step leaves its run RUNNING
    for ever, so when the worker that took the run stops sending heartbeats, the run is marked Crashed (naming the
    worker) so the parent can report it and a re-run resumes.
    """
    from prefect.settings import get_current_settings

    url = str(get_current_settings().api.url)
    with _WAITERS_LOCK:
        waiter = _WAITERS.get(url)
        if waiter is None or waiter.failed is not None:
            waiter = _WAITERS[url] = RunWaiter(url)
    return waiter.wait(flow_run_id, poll_seconds, on_start)


class RunWaiter:
    """Waits for the dispatched runs of every parent in this process with one client, one event subscription and
    one API read per interval for all of them.

    A waiter per dispatch (its own event loop, HTTP client with a fresh SSL context, and websocket) was about a
    sixth of a parent's Python with many parents in one process (a profile under 20 queued runs).
    """

    def __init__(self, url: str):
        import asyncio
        from concurrent.futures import Future

        self.url = url
        self.lock = threading.Lock()
        self.pending: dict[str, list[tuple[Future, float]]] = {}
        self.on_start: dict[str, list[Callable[[], None]]] = {}  # pending runs not yet seen taken by a worker
        self.loop = asyncio.new_event_loop()
        self.reads = 0  # API reads of the pending runs, for tests and benchmarks
        self.failed: BaseException | None = None  # set when the waiting thread stopped; a new waiter replaces it
        self.announced: set[str] = set()  # pending runs whose end the event stream announced
        self._wake: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),),
                                       name="quantmill-run-waiter", daemon=True)
        self.thread.start()

    def wait(self, flow_run_id: str, poll_seconds: float, on_start: Callable[[], None] | None = None) -> str:
        from concurrent.futures import Future

        done: Future = Future()
        with self.lock:
            if self.failed is not None:
                raise self.failed
            self.pending.setdefault(flow_run_id, []).append((done, poll_seconds))
            if on_start is not None:
                self.on_start.setdefault(flow_run_id, []).append(on_start)
        self.loop.call_soon_threadsafe(self._poke)
        return done.result()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _started(self, flow_run_id: str) -> None:
        with self.lock:
            calls = self.on_start.pop(flow_run_id, [])
        for call in calls:
            call()

    def _settle(self, flow_run_id: str, state: str | None = None, error: BaseException | None = None) -> None:
        self._started(flow_run_id)  # ended before any read saw it running
        with self.lock:
            waits = self.pending.pop(flow_run_id, [])
            self.announced.discard(flow_run_id)
        for done, _ in waits:
            done.set_exception(error) if error is not None else done.set_result(state)

    async def _serve(self) -> None:
        try:
            await self._serve_until_failure()
        except BaseException as e:  # noqa: BLE001 - every waiting parent hears it instead of waiting for ever
            with self.lock:
                self.failed = e if isinstance(e, Exception) else ServerError(f"waiting for runs stopped: {e!r}")
                waits = [done for ws in self.pending.values() for done, _ in ws]
                self.pending.clear()
                self.on_start.clear()
            for done in waits:
                done.set_exception(self.failed)

    async def _serve_until_failure(self) -> None:
        import asyncio
        import time

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._wake = asyncio.Event()
        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            async with get_client() as client:
                listening = asyncio.ensure_future(self._listen())
                checked = 0.0
                try:
                    while True:
                        with self.lock:
                            ids = list(self.pending)
                            interval = min((p for waits in self.pending.values() for _, p in waits), default=None)
                            if self.announced:  # announced, not yet readable: read again shortly
                                interval = min(interval or 0.2, 0.2)
                        self._wake.clear()  # before the read: a wait or an announcement during it reads again
                        if ids:
                            check_workers = time.monotonic() - checked > HEARTBEAT_CHECK_SECONDS
                            await self._read(client, ids, check_workers)
                            checked = time.monotonic() if check_workers else checked
                        try:
                            await asyncio.wait_for(self._wake.wait(), timeout=interval)
                        except asyncio.TimeoutError:
                            pass
                finally:
                    listening.cancel()

    async def _read(self, client, ids: list[str], check_workers: bool) -> None:
        """One read of every pending run: settle the ended, mark Crashed those whose worker went silent."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        self.reads += 1
        runs: list[Any] = []
        try:
            for at in range(0, len(ids), API_PAGE):
                page = ids[at:at + API_PAGE]
                runs += await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)),
                                                    limit=len(page))
        except Exception as e:  # noqa: BLE001 - a busy server (SQLite under load answers 503): ask again later
            if not transient(e):
                for flow_run_id in ids:
                    self._settle(flow_run_id, error=e)
            return
        running: list[Any] = []
        for run in runs:
            if run.state and not (run.state.is_scheduled() or run.state.is_pending()):
                self._started(str(run.id))
            if run.state and run.state.is_final():
                self._settle(str(run.id), run.state.type.value)
            elif check_workers and run.work_pool_name and run.state and run.state.is_running():
                running.append(run)
        workers: dict[str, list[Any]] = {}  # each pool's workers, read once per check
        for run in running:
            try:
                if run.work_pool_name not in workers:
                    workers[run.work_pool_name] = await client.read_workers_for_work_pool(run.work_pool_name)
                if await _crashed(client, run, workers[run.work_pool_name]):
                    self._settle(str(run.id), "CRASHED")
            except Exception as e:  # noqa: BLE001 - checked again at the next interval
                if not transient(e):
                    raise

    async def _listen(self) -> None:
        """Read at once when the server announces a final state of a pending run; quietly nothing without a stream
        (a proxy that refuses websockets, an old server): the interval's reads still find the end."""
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        final = [f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Crashed", "Cancelled")]
        try:
            async with get_events_subscriber(filter=EventFilter(event=EventNameFilter(name=[*final, RUNNING_EVENT])),
                                             reconnection_attempts=2) as events:
                async for event in events:
                    flow_run_id = event.resource.id.removeprefix("prefect.flow-run.")
                    with self.lock:
                        if event.event == RUNNING_EVENT:  # taken by a worker: read now if someone asks
                            mine = flow_run_id in self.on_start
                        else:
                            mine = flow_run_id in self.pending
                            if mine:
                                self.announced.add(flow_run_id)
                    if mine:
                        self._poke()
        except Exception:  # noqa: BLE001 - see the docstring
            pass


async def _crashed(client, run, workers: list[Any]) -> bool:
    """Mark ``run`` Crashed if the worker that took it (one of its pool's ``workers``) stopped sending heartbeats
    since it started the run; True if so."""
    from datetime import datetime, timezone

    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Crashed

    worker = worker_of(run)
    if not worker:
        return False
    found = [w for w in workers if w.name == worker]
    if not found or not found[0].last_heartbeat_time:
        return False
    # The worker's heartbeat, or the run's own last change (its start) when later: a busy server that refuses
    # heartbeats ('database is locked' on SQLite; the worker then backs off) does not make a worker that has just
    # started this run look gone.
    seen = max(found[0].last_heartbeat_time, run.state.timestamp)
    silent = (datetime.now(timezone.utc) - seen).total_seconds()
    if silent <= max(STALE_HEARTBEATS * (found[0].heartbeat_interval_seconds or 30), STALE_FLOOR_SECONDS):
        return False
    message = (f"worker {worker} of pool {run.work_pool_name} stopped (no heartbeat for {silent:.0f} s) while running "
               f"this step; finished steps are kept, re-run to resume")
    # Proposed, not forced: a run that ended since it was read keeps its end (the server rejects the change).
    result = await client.set_flow_run_state(run.id, Crashed(message=message))
    return result.status == SetStateStatus.ACCEPT


_WAITERS: dict[str, RunWaiter] = {}
_WAITERS_LOCK = threading.Lock()


def transient(exc: Exception) -> bool:
    """A server answer worth asking again: busy (429/503), a gateway, or the connection dropped."""
    import httpx

    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (429, 502, 503, 504) or isinstance(exc, (httpx.TransportError,))


# -- reading back what ran where -----------------------------------------------------------------------------
def flow_run_report(flow_run_id: str, *, wait_for: list[str] = (), wait_seconds: float = 15.0) -> dict[str, Any]:
    """A dispatched flow run as the API has it: state, pool, the worker that took it, and each task run's state by name.

    Task run states reach the API as events, after the flow run's own final state: ``wait_for`` names task runs
    to wait (up to ``wait_seconds``) to see in a final state.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_seconds
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            final = {t.name for t in tasks if t.state and t.state.is_final()}
            if set(wait_for) <= final or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    worker = worker_of(run)
    return {
        "id": str(run.id), "name": run.name, "state": run.state.type.value if run.state else None,
        "message": run.state.message if run.state else None, "pool": run.work_pool_name, "worker": worker,
        "start": run.start_time.isoformat() if run.start_time else None,
        "end": run.end_time.isoformat() if run.end_time else None,
        "created": run.created.isoformat() if run.created else None,
        "tasks": {t.name: {"state": t.state.type.value if t.state else None,
                           "message": t.state.message if t.state else None,
                           "start": t.start_time.isoformat() if t.start_time else None,
                           "end": t.end_time.isoformat() if t.end_time else None} for t in tasks},
    }
