"""A real Prefect server (``quantmill server`` on a free port) and workers as processes, for the tests that need
the API: pools, submitted runs, the Hydra launcher and scheduled deployments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import CONF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantmill.cli", *args]


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def killpg(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    """Signal the process and its children (a worker and the run it spawned), then SIGKILL if it lingers."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
            proc.wait(30)
            return
        except ProcessLookupError:
            proc.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def start_server(root: Path, **extra_env: str) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """`quantmill server` under ``root``; returns the process, its API URL and an environment pointing at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QUANTMILL_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", QUANTMILL_CONF=str(CONF),
               PREFECT_LOGGING_LEVEL="WARNING", **extra_env)
    log = open(root / "server.log", "w")
    server = subprocess.Popen(cli("server", "--port", str(port), "--home", str(root / "server-home")), env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["PREFECT_API_URL"] = url
    wait(lambda: healthy(url), 90, f"Prefect server on port {port} (log: {root / 'server.log'})")
    return server, url, env
