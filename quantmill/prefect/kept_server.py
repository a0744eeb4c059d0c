"""The kept API server of embedded runs: one per PREFECT_HOME, started by the first run that needs it and reused by
the runs after it, so that adding one quant to a cached model does not wait for a server to start each time.

It is a background service, not a child of the run: started detached (its own session, reparented once its
launcher exits), so a run's Ctrl-C or kill -9 does not reach it and it outlives the run by design. It stops itself
once no run has used it for ``idle`` seconds: each run that uses it leaves its pid in ``kept-server.clients/``
until it exits; the server counts a pid that is gone (a run killed with -9) as gone too.

    python -m quantmill.prefect.kept_server HOME IDLE_SECONDS     (what ``ensure`` starts; not for people)

``kept-server.json`` in PREFECT_HOME names the server (pid, url); it is written once the server answers and removed
when it stops. ``infra.server=temporary`` gives each run a server of its own that dies with it instead.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from quantmill.toolchain.interrupts import alive

STATE = "kept-server.json"
CLIENTS = "kept-server.clients"
LOCK = ".temporary-server.lock"  # shared with temporary servers: one migration of the database at a time
LOG = "kept-server.log"


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def running(home: Path) -> dict | None:
    """The kept server of ``home`` that answers, if there is one."""
    try:
        state = json.loads((home / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if alive(state["pid"]) and _healthy(state["url"]) else None


def ensure(home: Path, idle_seconds: float, timeout: float) -> str:
    """The URL of ``home``'s kept server, started if none answers; this process counts as its client until it exits."""
    home.mkdir(parents=True, exist_ok=True)
    (home / CLIENTS).mkdir(exist_ok=True)
    with open(home / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = running(home)
            if state is None:
                state = _start(home, idle_seconds, timeout)
            client = home / CLIENTS / str(os.getpid())
            client.touch()
            atexit.register(client.unlink, missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return state["url"]


def _start(home: Path, idle_seconds: float, timeout: float) -> dict:
    from quantmill.prefect.settings import ServerError

    (home / STATE).unlink(missing_ok=True)
    # The launcher forks the server and exits at once: the server is nobody's child, in a session of its own.
    launcher = subprocess.Popen([sys.executable, "-m", __name__, str(home), str(idle_seconds)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PREFECT_HOME": str(home)})
    launcher.wait()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads((home / STATE).read_text())
        except (OSError, ValueError):
            state = None
        if state and state.get("failed"):
            raise ServerError(f"Prefect's kept API server did not start ({state['failed']}; log: {home / LOG}); "
                              f"run with infra.server=temporary, or start one with `quantmill server` and set "
                              f"PREFECT_API_URL")
        if state and _healthy(state["url"]):
            return state
        time.sleep(0.05)
    raise ServerError(f"Prefect's kept API server did not answer within {timeout:g} s (log: {home / LOG}); raise "
                      f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run with infra.server=temporary")


def _serve(home: Path, idle_seconds: float) -> None:
    """The server process: uvicorn with Prefect's app, and a watch that ends it once idle."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    me = {"pid": os.getpid(), "url": url, "started": time.time(), "idle_seconds": idle_seconds}
    os.environ.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    state = home / STATE
    try:
        import uvicorn

        server = uvicorn.Server(uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                                               port=port, log_level="error", lifespan="on"))
    except Exception as e:  # an import that fails: say so to the run that waits
        state.write_text(json.dumps({**me, "failed": f"{type(e).__name__}: {e}"}))
        raise

    def announce_then_watch() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        tmp = state.with_name(f".{STATE}.{os.getpid()}")
        tmp.write_text(json.dumps(me))
        os.replace(tmp, state)
        clients, last_used = home / CLIENTS, time.monotonic()
        while not server.should_exit:
            users = [p for p in clients.iterdir() if p.name.isdigit()]
            for p in users:
                if not alive(int(p.name)):
                    p.unlink(missing_ok=True)
            if any(p.exists() for p in users):
                last_used = time.monotonic()
            elif time.monotonic() - last_used > idle_seconds:
                server.should_exit = True
            time.sleep(min(1.0, max(idle_seconds / 4, 0.05)))

    threading.Thread(target=announce_then_watch, daemon=True).start()
    try:
        server.run()
    finally:
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass


def main(argv: list[str]) -> int:
    home, idle = Path(argv[0]), float(argv[1])
    if os.fork() > 0:  # the launcher: gone at once, so the server is reparented and outlives the run
        os._exit(0)
    os.chdir(home)
    with open(home / LOG, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _serve(home, idle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
