"""A pool of type `warm`: its worker runs each step run in its own interpreter (quantmill.warm_worker), against a
real server and moto's S3; the API shows the run on the worker's own process id, and the result is the same. It
also keeps the next quantizer process of each calibrated backend it ran waiting, its libraries imported."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import QUICK
from tests.prefect_cluster import cli, killpg, start_server, wait

pytestmark = pytest.mark.slow
POOLS = "infra.pools={cpu:{capabilities:[cpu,llamacpp],type:warm}}"


def _warm_worker(tmp_path: Path, s3_endpoint: str, name: str, *args: str):
    """A server, a bucket called ``name`` on moto and a warm worker ``name`` on pool ``cpu``, online: (server, url,
    env, worker, client factory)."""
    import boto3

    server, url, env = start_server(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                                    AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    home = tmp_path / f"w-{name}"
    home.mkdir()
    worker = subprocess.Popen(cli("worker", "--pool", "cpu", "--name", f"w-{name}", "--cache-dir", str(home / "cache"),
                                  *args, POOLS), cwd=home, env={**env, "PREFECT_HOME": str(home / "prefect")},
                              stdout=open(home / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    from prefect.client.orchestration import get_client

    def client():
        return get_client(sync_client=True, httpx_settings={"base_url": url})

    def online():
        try:
            with client() as c:
                return any(w.name == f"w-{name}" for w in c.read_workers_for_work_pool("cpu"))
        except Exception:  # noqa: BLE001 - the pool appears when the worker starts
            return False

    try:
        wait(lambda: online() or worker.poll() is not None, 90, f"the warm worker (log {home / 'log'})")
        assert worker.poll() is None, (home / "log").read_text()
    except BaseException:
        killpg(worker)
        killpg(server)
        raise
    return server, url, env, worker, client


def test_a_warm_pool_runs_steps_in_the_workers_process(tmp_path, s3_endpoint):
    """... and takes each run as it is scheduled, not at its next poll."""
    server, url, env, worker, client = _warm_worker(tmp_path, s3_endpoint, "warm", "--poll-seconds", "30")
    try:
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


def _waiting_children(pid: int) -> dict[int, str]:
    """Child processes of ``pid`` that wait for a quantization request (``calibrated --wait``), with their
    command lines, from /proc."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if ppid == pid and "quantmill.backends.calibrated --wait" in cmdline:
            found[int(proc.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_a_warm_pool_keeps_the_next_quantizer_process_imported(tmp_path, s3_endpoint):
    """After a calibrated quantization, the warm worker starts that backend's next process and keeps it waiting:
    the pool's next quantization hands its request to a process that had imported torch and llm-compressor
    before it was asked. Stopping the worker ends the waiting process."""
    pytest.importorskip("llmcompressor")
    server, url, env, worker, _ = _warm_worker(tmp_path, s3_endpoint, "kept")
    kept: dict[int, str] = {}
    try:
        assert _waiting_children(worker.pid) == {}  # nothing is kept before a quantization ran here

        def quantize(seed: int) -> dict:  # another calibration seed: another calibration set, so a new quantize key
            parent = tmp_path / f"seed-{seed}"
            parent.mkdir()
            proc = subprocess.run(cli("run", "--json", "infra=prefect", POOLS, "store=s3", "store.bucket=kept",
                                      f"store.endpoint_url={s3_endpoint}", f"store.cache_dir={parent / 'cache'}",
                                      "publish.enabled=false", "validate.enabled=false", "recipe=[gptq_w4a16]",
                                      *QUICK, f"calibration.seed={seed}"),
                                  cwd=parent, env={**env, "PREFECT_HOME": str(parent / "prefect")},
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            step = {s["spec_id"]: s for s in json.loads(proc.stdout)["steps"]}["quantize:gptq_w4a16"]
            assert step["status"] == "ran", step
            return step["result"]["phases_s"]

        first = quantize(1)
        assert "imported_ahead" not in first  # a fresh process: it imported after the request
        kept = _waiting_children(worker.pid)
        assert len(kept) == 1 and "llmcompressor_quantizer" in next(iter(kept.values())), kept
        second = quantize(2)
        # handed to the kept process, which had imported before the request came (and then read it at once)
        assert second["imported_ahead"] > 0 and second["start"] < second["imported_ahead"], second
        assert not _alive(next(iter(kept)))  # that process did the quantization and ended
        kept = _waiting_children(worker.pid)
        assert len(kept) == 1, kept  # and the next one waits
    finally:
        killpg(worker)
        killpg(server)
    deadline = time.monotonic() + 30
    while any(map(_alive, kept)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in kept if _alive(pid)], "a kept quantizer outlived its worker"
