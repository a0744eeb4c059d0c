"""Waiting for dispatched step runs, and reading back what ran where."""

from __future__ import annotations

import threading
from typing import Any, Callable

from quantmill.prefect.settings import ServerError
from quantmill.prefect.workers import worker_of

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

    return RunWaiter.of(str(get_current_settings().api.url)).wait(flow_run_id, poll_seconds, on_start)


class RunWaiter:
    """Waits for the dispatched runs of every parent in this process with one client, one event subscription and
    one API read per interval for all of them.

    A waiter per dispatch (its own event loop, HTTP client with a fresh SSL context, and websocket) was about a
    sixth of a parent's Python with many parents in one process (a profile under 20 queued runs).
    """

    _by_server: dict[str, "RunWaiter"] = {}
    _by_server_lock = threading.Lock()

    @classmethod
    def of(cls, url: str) -> "RunWaiter":
        """This process's waiter for the server at ``url`` (a new one when the last one's thread stopped)."""
        with cls._by_server_lock:
            waiter = cls._by_server.get(url)
            if waiter is None or waiter.failed is not None:
                waiter = cls._by_server[url] = cls(url)
            return waiter

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
