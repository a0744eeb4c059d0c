"""The one harness for tests that need real services: a Prefect server (``quantmill server`` on a free port), an S3
endpoint (moto's server, a real HTTP API on 127.0.0.1) and workers as processes — for pools, warm pools, submitted
runs, the Hydra launcher and scheduled deployments."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from quantmill.prefect.workers import worker_of
from quantmill.toolchain.interrupts import descendants
from tests.conftest import CONF

# Pools with the capabilities the bundled model's GGUF and MLX recipes need; the S3 credentials moto accepts.
POOLS = "infra.pools={cpu:{capabilities:[cpu,llamacpp]},mac:{capabilities:[mlx]}}"
QUICK_VALIDATION = ["validate.n_chunks=2", "validate.n_ctx=128", "calibration.num_samples=16",
                    "calibration.seq_len=128"]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


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


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)


def crash(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything it started, as a machine that dies would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


class Cluster:
    """A Prefect server (``quantmill server``), an S3 endpoint and the workers started on them, each worker in a
    directory of its own (Prefect home, cache): nothing shared but the bucket and the server."""

    def __init__(self, root: Path, url: str, s3: str, env: dict[str, str], pools: str = POOLS,
                 bucket: str = "team-artifacts"):
        self.root, self.url, self.s3, self.env, self.pools, self.bucket = root, url, s3, env, pools, bucket
        self.workers: dict[str, subprocess.Popen] = {}

    @classmethod
    def start(cls, root: Path, s3: str, *, pools: str = POOLS, bucket: str = "team-artifacts") -> "Cluster":
        """A server under ``root`` with S3 credentials for ``s3`` in its environment, and ``bucket`` created there."""
        _server, url, env = start_server(root, **S3_ENV)
        make_bucket(s3, bucket)
        cluster = cls(root, url, s3, env, pools, bucket)
        cluster.server = _server
        return cluster

    def start_worker(self, pool: str, name: str, *args: str, poll_seconds: str = "0.5", **env: str) -> subprocess.Popen:
        """``quantmill worker`` for ``pool``, online before this returns (``args`` and ``env`` added)."""
        home = self.root / name
        home.mkdir(exist_ok=True)
        log = open(home / "worker.log", "a")
        proc = subprocess.Popen(cli("worker", "--pool", pool, "--name", name, "--cache-dir", str(home / "cache"),
                                    "--poll-seconds", poll_seconds, "--heartbeat-seconds", "2", *args, self.pools),
                                cwd=home, env={**self.env, "PREFECT_HOME": str(home / "prefect"), **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait(lambda: self.worker_online(pool, name) or proc.poll() is not None, 90, f"worker {name}")
            assert proc.poll() is None, (home / "worker.log").read_text()
        except BaseException:
            killpg(proc)
            raise
        self.workers[name] = proc
        return proc

    def stop(self) -> None:
        for worker in self.workers.values():
            killpg(worker, signal.SIGINT)
        killpg(self.server, signal.SIGINT)

    def worker_online(self, pool: str, name: str) -> bool:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True, httpx_settings={"base_url": self.url}) as client:
            try:
                workers = client.read_workers_for_work_pool(pool)
            except Exception:  # noqa: BLE001 - the pool is created by the worker's start
                return False
        return any(w.name == name and str(w.status).upper().endswith("ONLINE") for w in workers)

    def overrides(self, *extra: str) -> list[str]:
        return ["infra=prefect", self.pools, "store=s3", f"store.bucket={self.bucket}", f"store.endpoint_url={self.s3}",
                "publish.enabled=false", *QUICK_VALIDATION, *extra]

    def run(self, *extra: str, name: str = "parent") -> subprocess.Popen:
        home = self.root / name
        home.mkdir(exist_ok=True)
        env = {**self.env, "PREFECT_HOME": str(home / "prefect")}
        return subprocess.Popen(cli("run", "--json", *self.overrides(f"store.cache_dir={home / 'cache'}", *extra)),
                                cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def run_to_end(self, *extra: str, name: str = "parent") -> tuple[int, dict, str]:
        proc = self.run(*extra, name=name)
        out, err = proc.communicate(timeout=600)
        return proc.returncode, json.loads(out) if out.strip().startswith("{") else {}, err

    def client(self):
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True, httpx_settings={"base_url": self.url})

    def where_steps_ran(self) -> dict[str, list[tuple[str, str]]]:
        """task run name (a spec id) -> [(pool, worker)] of every step flow run that ran it, from the API."""
        with self.client() as client:
            runs = {r.id: r for r in client.read_flow_runs() if r.work_pool_name}
            tasks = client.read_task_runs()
        where: dict[str, list[tuple[str, str]]] = {}
        for t in tasks:
            run = runs.get(t.flow_run_id)
            if run is not None and t.state and t.state.is_completed():
                where.setdefault(t.name, []).append((run.work_pool_name, worker_of(run)))
        return where

    def bucket_objects(self) -> dict[str, list[str]]:
        """artifact key -> object names under it, listed from the bucket."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")  # the credentials moto accepts
        found: dict[str, list[str]] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                parts = obj["Key"].split("/")  # quantmill/objects/<key>/...
                if parts[1] != "objects":  # the store's state (a killed worker's lease, left to expire)
                    continue
                found.setdefault(parts[2], []).append("/".join(parts[3:]))
        return found

    def auditor(self, name: str = "auditor"):
        """A third machine's view of the bucket, with its own empty cache."""
        from quantmill.store.s3 import S3Store

        return S3Store(self.bucket, "quantmill", endpoint_url=self.s3, cache_dir=self.root / name)


