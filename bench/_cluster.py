"""A throwaway pools cluster on this machine for benchmarks: `quantmill server`, moto's S3 server, and workers,
each worker in its own directory with its own Prefect home and artifact cache (nothing shared but S3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CREDS = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantmill.cli", *args]


def wait(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


@dataclass
class Cluster:
    root: Path
    url: str
    endpoint: str
    bucket: str
    env: dict[str, str]
    procs: list = field(default_factory=list)
    s3: object = None

    def store_overrides(self, cache: str) -> list[str]:
        return ["store=s3", f"store.bucket={self.bucket}", f"store.endpoint_url={self.endpoint}",
                f"store.cache_dir={self.root / cache}"]

    def workers_online(self, pool: str) -> int:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as c:
            try:
                return len([w for w in c.read_workers_for_work_pool(pool) if "ONLINE" in str(w.status).upper()])
            except Exception:  # noqa: BLE001 - the pool appears with its first worker
                return 0

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(2)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.s3.stop()


def start(workers: list[tuple[str, str, list[str]]], pools_override: str, bucket: str = "bench",
          database_url: str | None = None) -> Cluster:
    """Start the server (SQLite, or ``database_url``), S3 and ``workers`` [(pool, name, extra worker args)];
    return when all are online."""
    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    root = Path(tempfile.mkdtemp(prefix="quantmill-cluster-"))
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    host, s3_port = s3.get_host_and_port()
    endpoint = f"http://{host}:{s3_port}"
    os.environ.update(CREDS)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(CREDS, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", QUANTMILL_CONF=str(REPO / "conf"))
    cluster = Cluster(root, url, endpoint, bucket, env, s3=s3)
    database = ["--database-url", database_url] if database_url else []
    cluster.procs.append(subprocess.Popen(cli("server", "--port", str(port), "--home", str(root / "server"), *database), env=env,
                                          stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT))
    env["PREFECT_API_URL"] = url

    def healthy():
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait(healthy, 120, "the server")
    os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(root / "parent"), PREFECT_LOGGING_LEVEL="ERROR",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false")
    for pool, name, extra in workers:
        (root / name).mkdir()
        cluster.procs.append(subprocess.Popen(
            cli("worker", "--pool", pool, "--name", name, "--cache-dir", str(root / name / "cache"),
                "--poll-seconds", "0.5", *extra, pools_override),
            cwd=root / name, env={**env, "PREFECT_HOME": str(root / name / "prefect")},
            stdout=open(root / name / "worker.log", "w"), stderr=subprocess.STDOUT))
    for pool in {w[0] for w in workers}:
        count = sum(1 for w in workers if w[0] == pool)
        wait(lambda: cluster.workers_online(pool) == count, 180, f"{count} worker(s) of pool {pool}")
    return cluster
