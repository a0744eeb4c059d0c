"""A pool of type `warm`: its worker runs each step run in its own interpreter (quantmill.prefect.warm_worker), against a
real server and moto's S3; the API shows the run on the worker's own process id, and the result is the same. It
also keeps the next quantizer process of each calibrated backend it ran waiting, its libraries imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmill.prefect.workers import worker_of
from quantmill.toolchain.interrupts import alive, descendants
from tests.conftest import QUICK
from tests.harness import Cluster, cli, killpg, wait

pytestmark = pytest.mark.slow
POOLS = "infra.pools={cpu:{capabilities:[cpu,llamacpp],type:warm}}"


def _warm_worker(tmp_path: Path, s3_endpoint: str, name: str, *args: str, poll_seconds: str = "1",
                 **worker_env: str):
    """A server, a bucket called ``name`` on moto and a warm worker ``w-NAME`` on pool ``cpu`` (``worker_env`` added
    to its environment), online: (server, url, env, worker, client factory)."""
    cluster = Cluster.start(tmp_path, s3_endpoint, pools=POOLS, bucket=name)
    try:
        worker = cluster.start_worker("cpu", f"w-{name}", *args, poll_seconds=poll_seconds, **worker_env)
    except BaseException:
        cluster.stop()
        raise
    return cluster.server, cluster.url, cluster.env, worker, cluster.client


def _run(parent: Path, env: dict[str, str], s3_endpoint: str, bucket: str, *overrides: str) -> dict:
    """`quantmill run --json` on the warm pool from its own directory ``parent`` (store: ``bucket`` on moto);
    its report."""
    parent.mkdir()
    proc = subprocess.run(cli("run", "--json", "infra=prefect", POOLS, "store=s3", f"store.bucket={bucket}",
                              f"store.endpoint_url={s3_endpoint}", f"store.cache_dir={parent / 'cache'}",
                              "publish.enabled=false", *QUICK, *overrides),
                          cwd=parent, env={**env, "PREFECT_HOME": str(parent / "prefect")}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_warm_pool_runs_steps_in_the_workers_process(tmp_path, s3_endpoint):
    """... and takes each run as it is scheduled, not at its next poll, straight from Pending to Running; Ctrl-C
    stops it cleanly."""
    server, url, env, worker, client = _warm_worker(tmp_path, s3_endpoint, "warm", poll_seconds="30")
    try:
        with client() as c:
            assert c.read_work_pool("cpu").type == "quantmill-warm"
        steps = _run(tmp_path / "parent", env, s3_endpoint, "warm", "recipe=[gguf_q8_0]")["steps"]
        assert {s["status"] for s in steps} == {"ran"} and all(s["result"].get("status") != "failed" for s in steps)
        with client() as c:
            # the step runs (tagged by dispatch), not the watch's scheduled runs the worker's deployments made
            runs = [r for r in c.read_flow_runs() if "pool:cpu" in r.tags]
        assert runs and {r.state.type.value for r in runs} == {"COMPLETED"}
        assert {r.infrastructure_pid for r in runs} == {str(worker.pid)}  # no process was started for them
        # Labelled with the worker (workers.worker_of: the parent's check of a running run's worker reads it), and
        # from Pending straight to Running: no Submitting round trip between the claim and the start.
        assert {worker_of(r) for r in runs} == {"w-warm"}
        with client() as c:
            histories = {tuple(state.name for state in c.read_flow_run_states(r.id)) for r in runs}
        assert histories == {("Scheduled", "Pending", "Running", "Completed")}, histories
        # Polled every 30 s, yet each step run was taken within seconds: the worker polls when the server
        # announces a run scheduled on its pool, and when a run of its own ends.
        pickups = sorted((r.start_time - r.created).total_seconds() for r in runs)
        assert pickups[-1] < 10, pickups
        # Ctrl-C (SIGINT) is how a worker is stopped: a clean exit, no traceback in its log.
        killpg(worker)
        log = (tmp_path / "w-warm" / "worker.log").read_text()
        assert worker.returncode == 0 and "Traceback" not in log, log[-3000:]
    finally:
        killpg(worker)
        killpg(server)


def _commands(pids: list[int]) -> dict[int, str]:
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # ended meanwhile
    return found


def test_ctrl_c_to_a_warm_worker_with_a_step_in_flight_ends_the_step_at_once(tmp_path, s3_endpoint):
    """SIGINT to the worker alone (as `kill -INT` or a service manager sends it; a terminal's Ctrl-C would reach
    the step's tool as well): the step's converter process is stopped, the step fails with nothing in the bucket,
    its run's end is on the server, and the worker exits 0 with one line, before its stop deadline's dump."""
    import boto3

    server, url, env, worker, client = _warm_worker(tmp_path, s3_endpoint, "inflight")
    parent_dir = tmp_path / "parent"
    parent_dir.mkdir()
    parent = subprocess.Popen(cli("run", "infra=prefect", POOLS, "store=s3", "store.bucket=inflight",
                                  f"store.endpoint_url={s3_endpoint}", f"store.cache_dir={parent_dir / 'cache'}",
                                  "publish.enabled=false", "validate.enabled=false", *QUICK, "recipe=[gguf_q8_0]"),
                              cwd=parent_dir, env={**env, "PREFECT_HOME": str(parent_dir / "prefect")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "w-inflight" / "worker.log"
    try:
        def converting() -> dict[int, str]:
            return {pid: c for pid, c in _commands(descendants(worker.pid)).items() if "convert_hf_to_gguf" in c}

        tools = wait(lambda: converting() or parent.poll() is not None, 300, "the worker to start the converter")
        assert isinstance(tools, dict), f"the run ended first ({parent.returncode})"
        os.kill(worker.pid, signal.SIGINT)
        worker.wait(120)
        text = log.read_text()
        assert worker.returncode == 0, text[-3000:]
        assert "quantmill worker: stopping with 1 run(s) in flight; their steps are ended" in text, text[-3000:]
        assert "still stopping" not in text and "Traceback" not in text, text[-3000:]
        assert not [pid for pid in tools if alive(pid)], "the converter outlived its worker"
        with client() as c:
            runs = [r for r in c.read_flow_runs() if "pool:cpu" in r.tags]
        states = {r.state.type.value for r in runs}
        assert "RUNNING" not in states and "FAILED" in states, states
        bucket = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing").list_objects_v2(Bucket="inflight")
        assert not [o["Key"] for o in bucket.get("Contents", []) if o["Key"].endswith(".gguf")]
    finally:
        killpg(parent)
        killpg(worker)
        killpg(server)


def test_a_busy_warm_worker_does_not_ask_for_runs_it_cannot_take(tmp_path, s3_endpoint):
    """At its ``--limit`` the worker stops asking the server for scheduled runs (every poll is work for the
    server), though it polls every 0.5 s, and asks again as soon as its run ends. Its own debug log, one line per
    ask, against the step runs' times read back from the API."""
    server, url, env, worker, client = _warm_worker(tmp_path, s3_endpoint, "busy", "--limit", "1", poll_seconds="0.5",
                                                    PREFECT_LOGGING_LEVEL="DEBUG")
    log = tmp_path / "w-busy" / "worker.log"
    try:
        _run(tmp_path / "parent", env, s3_endpoint, "busy", "recipe=[gguf_q8_0]")
        with client() as c:
            runs = [r for r in c.read_flow_runs() if "pool:cpu" in r.tags]
        last_end = max(r.end_time.timestamp() for r in runs)
        # idle again: wait for the worker's first ask after the last run ended
        wait(lambda: any(t > last_end for t in _asks(log)), 30, "the worker to ask for runs again")
    finally:
        killpg(worker)
        killpg(server)
    asks = _asks(log)
    busy = [(r.start_time.timestamp() + 0.5, r.end_time.timestamp() - 0.5) for r in runs]
    assert busy and sum(b - a for a, b in busy) > 2, busy  # long enough for several polls of 0.5 s
    assert [t for t in asks if any(a < t < b for a, b in busy)] == [], (asks, busy)
    for run in runs:  # each run's end freed the slot, and the worker asked at once
        assert [t for t in asks if run.end_time.timestamp() - 0.5 < t < run.end_time.timestamp() + 2], (asks, busy)


def _asks(log: Path) -> list[float]:
    """When the worker asked the server for scheduled runs: one debug line per ask."""
    import re
    from datetime import datetime

    day = datetime.now().astimezone()
    return [day.replace(hour=int(h), minute=int(m), second=int(sec), microsecond=int(ms) * 1000).timestamp()
            for h, m, sec, ms in re.findall(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) .*Querying for flow runs",
                                            log.read_text(), re.M)]


def _waiting_children(pid: int) -> dict[int, str]:
    """Processes below ``pid`` that wait for a quantization request (``quantizer_process --wait``), with their
    command lines."""
    return {p: c for p, c in _commands(descendants(pid)).items() if "quantmill.backends.quantizer_process --wait" in c}


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
            report = _run(tmp_path / f"seed-{seed}", env, s3_endpoint, "kept", "validate.enabled=false",
                          "recipe=[gptq_w4a16]", f"calibration.seed={seed}")
            step = {s["spec_id"]: s for s in report["steps"]}["quantize:gptq_w4a16"]
            assert step["status"] == "ran", step
            return step["result"]["phases_s"]

        first = quantize(1)
        assert "imported_ahead" not in first  # a fresh process: it imported after the request
        kept = _waiting_children(worker.pid)
        assert len(kept) == 1 and "llmcompressor_quantizer" in next(iter(kept.values())), kept
        second = quantize(2)
        # handed to the kept process, which had imported before the request came (and then read it at once)
        assert second["imported_ahead"] > 0 and second["start"] < second["imported_ahead"], second
        assert not alive(next(iter(kept)))  # that process did the quantization and ended
        kept = _waiting_children(worker.pid)
        assert len(kept) == 1, kept  # and the next one waits
    finally:
        killpg(worker)
        killpg(server)
    deadline = time.monotonic() + 30
    while any(map(alive, kept)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in kept if alive(pid)], "a kept quantizer outlived its worker"


STOP_STUCK = """
import threading

import anyio

from quantmill.prefect import warm_worker

warm_worker.STOP_SECONDS = 2.0


def flush_that_never_ends():
    threading.Event().wait()


async def serving():
    warm_worker._on_ctrl_c_arm_deadline()
    print("serving", flush=True)
    await anyio.sleep_forever()


warm_worker.take_ctrl_c()
threading.Thread(target=flush_that_never_ends).start()  # not a daemon: the interpreter's exit waits for it
try:
    anyio.run(serving)
except KeyboardInterrupt:
    print("left the loop", flush=True)
"""


def test_a_worker_that_cannot_finish_stopping_exits_after_its_deadline_saying_where_it_hung():
    """Started with SIGINT ignored (as a script's background job is), the worker takes Ctrl-C back: it cancels
    the worker's loop as before. If what follows never ends, the deadline armed by that Ctrl-C writes each
    thread's stack and ends the process with 1."""
    proc = subprocess.Popen([sys.executable, "-c", STOP_STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline() == "serving\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        killpg(proc)
    assert out == "left the loop\n", err
    assert proc.returncode == 1, err
    assert "quantmill worker: still stopping 2 s after Ctrl-C" in err
    assert "flush_that_never_ends" in err  # the stuck thread, named in its stack
    assert "KeyboardInterrupt" not in err
