"""A pool of type `warm`: its worker runs each step run in its own interpreter (quantmill.warm_worker), against a
real server and moto's S3; the API shows the run on the worker's own process id, and the result is the same."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import QUICK
from tests.prefect_cluster import cli, killpg, start_server, wait

pytestmark = pytest.mark.slow
POOLS = "infra.pools={cpu:{capabilities:[cpu,llamacpp],type:warm}}"


def test_a_warm_pool_runs_steps_in_the_workers_process(tmp_path, s3_endpoint):
    """... and takes each run as it is scheduled, not at its next poll."""
    import boto3

    server, url, env = start_server(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                                    AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="warm")
    home = tmp_path / "w-warm"
    home.mkdir()
    worker = subprocess.Popen(cli("worker", "--pool", "cpu", "--name", "w-warm", "--cache-dir", str(home / "cache"),
                                  "--poll-seconds", "30", POOLS), cwd=home,
                              env={**env, "PREFECT_HOME": str(home / "prefect")}, stdout=open(home / "log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect.client.orchestration import get_client

        def client():
            return get_client(sync_client=True, httpx_settings={"base_url": url})

        def online():
            try:
                with client() as c:
                    return any(w.name == "w-warm" for w in c.read_workers_for_work_pool("cpu"))
            except Exception:  # noqa: BLE001 - the pool appears when the worker starts
                return False

        wait(lambda: online() or worker.poll() is not None, 90, f"the warm worker (log {home / 'log'})")
        assert worker.poll() is None, (home / "log").read_text()
        with client() as c:
            assert c.read_work_pool("cpu").type == "quantmill-warm"
        parent = tmp_path / "parent"
        parent.mkdir()
        proc = subprocess.run(cli("run", "--json", "infra=prefect", POOLS, "store=s3", "store.bucket=warm",
                                  f"store.endpoint_url={s3_endpoint}", f"store.cache_dir={parent / 'cache'}",
                                  "publish.enabled=false", "recipe=[gguf_q8_0]", *QUICK),
                              cwd=parent, env={**env, "PREFECT_HOME": str(parent / "prefect")}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        steps = json.loads(proc.stdout)["steps"]
        assert {s["status"] for s in steps} == {"ran"} and all(s["result"].get("status") != "failed" for s in steps)
        with client() as c:
            # the step runs (tagged by dispatch), not the watch's scheduled runs the worker's deployments made
            runs = [r for r in c.read_flow_runs() if "pool:cpu" in r.tags]
        assert runs and {r.state.type.value for r in runs} == {"COMPLETED"}
        assert {r.infrastructure_pid for r in runs} == {str(worker.pid)}  # no process was started for them
        assert all("worker:w-warm" in r.tags for r in runs)
        # Polled every 30 s, yet each step run was taken within seconds: the worker polls when the server
        # announces a run scheduled on its pool, and when a run of its own ends.
        pickups = sorted((r.start_time - r.created).total_seconds() for r in runs)
        assert pickups[-1] < 10, pickups
    finally:
        killpg(worker)
        killpg(server)
