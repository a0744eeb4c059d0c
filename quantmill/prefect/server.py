"""The Prefect server: where it is, whether it answers, and the command that starts one."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from quantmill.config import InfraConfig
from quantmill.prefect.settings import ServerError, quiet


def api_url(infra: InfraConfig) -> str:
    url = infra.api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        raise ServerError("infra.mode=prefect needs a Prefect server: set infra.api_url or PREFECT_API_URL (start one "
                          "with `quantmill server`), or run embedded with infra=embedded")
    return url.rstrip("/")


BUSY_SERVER_SECONDS = 30.0  # how long a server that answers late is asked again before it counts as unreachable


def check_server(url: str) -> None:
    """One line if the server does not answer, naming it and the way to run without one."""
    import httpx

    deadline = time.monotonic() + BUSY_SERVER_SECONDS
    while True:
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
            return
        except (httpx.TimeoutException, httpx.HTTPStatusError) as e:
            # a server that is there but busy (a loaded machine, SQLite writes) answers late: ask again a while
            if time.monotonic() < deadline and not (isinstance(e, httpx.HTTPStatusError)
                                                    and e.response.status_code < 500):
                time.sleep(1)
                continue
            error: httpx.HTTPError = e
        except httpx.HTTPError as e:
            error = e
        reason = type(error).__name__ if not str(error) else str(error).splitlines()[0]
        raise ServerError(f"Prefect server at {url} is unreachable ({reason}); start it with `quantmill server`, fix "
                          f"infra.api_url / PREFECT_API_URL, or run embedded with infra=embedded") from None


# A process that starts many runs (a batch, the Hydra launcher, parents in threads) checks the server and its
# deployments once per this many seconds, not once per run (each check is a new HTTP client and a request).


class Checks:
    """What this process checked on the server lately (the server answers, a pool's deployment and workers): a
    process that starts many runs (a batch, the Hydra launcher, parents in threads) checks each once per
    ``ttl`` seconds, not once per run (each check is a new HTTP client and a request)."""

    TTL_SECONDS = 10.0

    def __init__(self) -> None:
        self._seen: dict[Any, tuple[float, Any]] = {}

    def recent(self, key: Any, ttl: float = TTL_SECONDS) -> tuple[bool, Any]:
        """(True, what was remembered) when ``key`` was remembered less than ``ttl`` seconds ago, else (False, None)."""
        hit = self._seen.get(key)
        return (True, hit[1]) if hit and time.monotonic() - hit[0] < ttl else (False, None)

    def remember(self, key: Any, value: Any = None) -> None:
        self._seen[key] = (time.monotonic(), value)


CHECKS = Checks()


def connect(infra: InfraConfig, *, verbose: bool = False) -> str:
    """Point this process's Prefect client at the configured server (before Prefect is imported) and check it."""
    url = api_url(infra)
    if not CHECKS.recent(("server", url))[0]:
        check_server(url)
        CHECKS.remember(("server", url))
    os.environ["PREFECT_API_URL"] = url
    quiet(verbose)
    return url


def server_command(*, host: str, port: int, database_url: str | None) -> tuple[list[str], dict[str, str]]:
    """``prefect server start`` with SQLite under PREFECT_HOME by default, PostgreSQL (or any URL) if given."""
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED",
                                                                                                "true")}
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env



def client():
    """A synchronous client of the server this process points at."""
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


class TemporaryServer:
    """This process's temporary API server for embedded runs, started on first use and kept for the process's
    later runs (a batch, a sweep, a test session), as Prefect keeps its own: in a session of its own (a terminal's
    Ctrl-C reaches the run, which stops it, not the server mid-request), its log under PREFECT_HOME instead of the
    terminal, and a parent-death signal (it dies with this process even when that is killed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None
        self.url: str | None = None

    def ensure(self, infra: InfraConfig) -> str:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start(infra)
            return self.url

    def _start(self, infra: InfraConfig) -> None:
        import socket

        import prefect

        from quantmill.toolchain.tools import SETPRIV

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        home = Path(os.environ.get("PREFECT_HOME", infra.prefect_home)).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                   "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "error", "--lifespan", "on"]
        if SETPRIV:
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        log_path = home / "temporary-server.log"
        # Two runs of one project start at once: their servers migrate one SQLite database, one at a time.
        with open(home / ".temporary-server.lock", "a") as lock:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._launch(command, env, log_path, port)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _launch(self, command: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        import atexit
        import subprocess

        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        limit = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        deadline = time.monotonic() + limit
        while True:
            if proc.poll() is not None:
                raise ServerError(f"Prefect's temporary API server exited with code {proc.returncode} at its start "
                                  f"(log: {log_path}); start one with `quantmill server` and set PREFECT_API_URL")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise ServerError(f"Prefect's temporary API server did not answer within {limit:g} s (log: "
                                  f"{log_path}); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one "
                                  f"with `quantmill server` and set PREFECT_API_URL")
            time.sleep(0.1)
        if self._proc is None:
            # Registered before Prefect's services start: it runs after they have drained at exit (LIFO).
            atexit.register(self.stop)
        self._proc, self.url = proc, url

    def stop(self) -> None:
        import subprocess

        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


TEMPORARY = TemporaryServer()


@contextmanager
def temporary_server(infra: InfraConfig) -> Iterator[str | None]:
    """The API an embedded run reports to: None (Prefect's own setting) where a server is configured, else the
    project's kept server (``infra.server=kept``) or this process's temporary server."""
    if infra.api_url or os.environ.get("PREFECT_API_URL"):
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if infra.server == "kept":
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        from quantmill.prefect import kept_server

        home = Path(os.environ.get("PREFECT_HOME", infra.prefect_home)).expanduser()
        url = kept_server.ensure(home, infra.server_idle_seconds,
                                 float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    else:
        url = TEMPORARY.ensure(infra)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
