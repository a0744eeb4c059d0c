"""Worker pools, all real: a Prefect server started here on a free port, moto's S3 server, and two workers on two
pools, each in its own directory with its own Prefect home and artifact cache (they share nothing but S3).

The parent runs are `quantmill run infra=prefect` processes; what ran where is read back from Prefect's API and
from the bucket.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from quantmill.prefect.workers import worker_of
from quantmill.toolchain.interrupts import descendants
from tests.conftest import CONF
from tests.harness import Cluster, crash
from tests.harness import cli as _cli
from tests.harness import free_port as _free_port
from tests.harness import wait as _wait

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def s3(s3_endpoint):
    return s3_endpoint


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """`quantmill server`, a bucket, and workers `w-cpu` (pool cpu) and `w-mac` (pool mac)."""
    c = Cluster.start(tmp_path_factory.mktemp("pools"), s3)
    c.start_worker("cpu", "w-cpu")
    c.start_worker("mac", "w-mac")
    yield c
    c.stop()


def _steps(report: dict) -> dict[str, dict]:
    return {s["spec_id"]: s for s in report["steps"]}


def _s3_env(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)


def test_one_run_sends_gguf_steps_to_cpu_pool_and_mlx_steps_to_mac_pool(cluster, monkeypatch):
    _s3_env(monkeypatch)
    code, report, err = cluster.run_to_end("recipe=[gguf_q8_0,mlx_4bit]")
    assert code == 0, err
    steps = _steps(report)
    assert {s["status"] for s in steps.values()} == {"ran"}, steps
    where = cluster.where_steps_ran()
    for spec in ("download", "validate:evalset", "convert:gguf-f16", "quantize:gguf_q8_0", "validate:gguf_q8_0"):
        assert where[spec] == [("cpu", "w-cpu")], (spec, where)
    for spec in ("convert:mlx-float16", "quantize:mlx_4bit", "validate:reference-mlx", "validate:mlx_4bit"):
        assert where[spec] == [("mac", "w-mac")], (spec, where)

    objects = cluster.bucket_objects()
    assert set(objects) == {s["key"] for s in steps.values()}  # one artifact per step, nothing else
    auditor = cluster.auditor()
    for key, names in objects.items():
        assert "provenance.json" in names
        assert auditor.verify(key) == [], key  # every file re-downloaded and re-hashed by a third party
    record = auditor.statement(steps["quantize:mlx_4bit"]["key"])
    run = next(b for b in record["predicate"]["runDetails"]["byproducts"] if b["name"] == "run")["annotations"]
    assert (run["pool"], run["worker"]) == ("mac", "w-mac")
    assert record["predicate"]["runDetails"]["builder"]["id"].endswith("/prefect-pool")
    with cluster.client() as client:
        flow_run = client.read_flow_run(run["prefect_flow_run_id"])
    assert flow_run.work_pool_name == "mac" and worker_of(flow_run) == "w-mac"
    # No shared filesystem: the mac worker fetched the download from S3 into its own cache, never a GGUF.
    mac_cache = cluster.root / "w-mac" / "cache" / "objects"
    assert steps["download"]["key"] in {p.name for p in mac_cache.iterdir()}
    assert steps["convert:gguf-f16"]["key"] not in {p.name for p in mac_cache.iterdir()}

    # Re-running dispatches nothing: every step is answered from the bucket.
    code, again, err = cluster.run_to_end("recipe=[gguf_q8_0,mlx_4bit]")
    assert code == 0, err
    assert {s["status"] for s in again["steps"]} == {"cached"}
    assert again["seconds"] < 15


def test_worker_killed_mid_step_leaves_nothing_partial_and_a_rerun_resumes(cluster, monkeypatch):
    _s3_env(monkeypatch)
    # A new evaluation set: MLX validation re-runs on the mac pool, and takes long enough (tens of seconds on
    # mlx's CPU build) to be killed in the middle.
    extra = ("recipe=[mlx_4bit]", "validate.n_chunks=4", "validate.n_ctx=256")
    parent = cluster.run(*extra, name="fault")

    def validation_running():
        with cluster.client() as client:
            return any(t.name == "validate:mlx_4bit" and t.state and t.state.is_running()
                       for t in client.read_task_runs())

    _wait(validation_running, 300, "validate:mlx_4bit to be running")
    worker = cluster.workers["w-mac"]

    def evaluating():  # the evaluation process has started: the kill lands in the middle of the step
        for pid in descendants(worker.pid):
            try:
                if b"quantmill.evaluation" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
        return False

    _wait(evaluating, 120, "the evaluation process of validate:mlx_4bit")
    crash(worker)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 1, err
    steps = _steps(json.loads(out))
    lost = steps["validate:mlx_4bit"]
    assert lost["status"] == "failed"
    assert "worker w-mac of pool mac stopped (no heartbeat for" in lost["error"], lost
    finished = {sid for sid, s in steps.items() if s["status"] in ("ran", "cached")}
    assert {"download", "convert:mlx-float16", "quantize:mlx_4bit", "validate:evalset",
            "validate:reference-mlx"} <= finished

    auditor = cluster.auditor("auditor-fault")
    for key, names in cluster.bucket_objects().items():  # no partial artifact: every key is complete and verifies
        assert "provenance.json" in names and auditor.verify(key) == [], key

    # The rerun is submitted while pool mac has no worker: it says so on stderr, waits, and finishes once one starts.
    _wait(lambda: not cluster.worker_online("mac", "w-mac"), 120, "the server to see w-mac offline")
    rerun = cluster.run(*extra, name="fault")

    def step_waiting_on_mac():
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )

        scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"])))
        with cluster.client() as client:
            return client.read_flow_runs(flow_run_filter=scheduled,
                                         work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=["mac"])))

    _wait(lambda: step_waiting_on_mac() or rerun.poll() is not None, 300, "a step run waiting on pool mac")
    cluster.start_worker("mac", "w-mac")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert "pool 'mac' has no worker online" in err
    again = _steps(json.loads(out))  # the warning is not in the report
    assert {sid for sid, s in again.items() if s["status"] == "cached"} == finished
    assert again["validate:mlx_4bit"]["status"] == "ran"
    assert again["validate:mlx_4bit"]["result"]["status"] == "passed"


def test_two_identical_runs_at_once_make_one_artifact_per_key(cluster, monkeypatch):
    _s3_env(monkeypatch)
    extra = ("recipe=[gguf_q3_k_m]", "validate.enabled=false")
    first, second = cluster.run(*extra, name="twin-a"), cluster.run(*extra, name="twin-b")
    results = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(_steps(json.loads(out)))
    a, b = results
    assert set(a) == set(b)
    for sid in a:
        assert (a[sid]["key"], a[sid]["digest"]) == (b[sid]["key"], b[sid]["digest"]), sid
    objects = cluster.bucket_objects()
    auditor = cluster.auditor("auditor-twins")
    for sid in a:
        assert objects[a[sid]["key"]].count("provenance.json") == 1
        assert auditor.verify(a[sid]["key"]) == []


def test_an_object_altered_in_the_bucket_is_refused_by_the_worker_that_fetches_it(cluster, monkeypatch):
    import shutil

    import boto3

    _s3_env(monkeypatch)
    code, report, err = cluster.run_to_end("recipe=[gguf_q8_0]", "validate.enabled=false")
    assert code == 0, err
    f16 = _steps(report)["convert:gguf-f16"]["key"]
    s3 = boto3.client("s3", endpoint_url=cluster.s3)
    name = next(f"quantmill/objects/{f16}/{n}" for n in cluster.bucket_objects()[f16] if n.endswith(".gguf"))
    data = bytearray(s3.get_object(Bucket="team-artifacts", Key=name)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket="team-artifacts", Key=name, Body=bytes(data))
    shutil.rmtree(cluster.root / "w-cpu" / "cache" / "objects" / f16)  # the worker must fetch it again

    code, report, err = cluster.run_to_end("recipe=[gguf_q4_0]", "validate.enabled=false")
    assert code == 1
    failed = _steps(report)["quantize:gguf_q4_0"]
    assert failed["status"] == "failed"
    assert "model-f16.gguf has sha256" in failed["error"] and "the object was altered: not used" in failed["error"]
    assert "quantize:gguf_q4_0" not in cluster.where_steps_ran()


def test_a_batch_on_pools_is_one_parent_run_for_all_its_models(cluster, monkeypatch, tmp_path):
    """`quantmill batch` on pools: every model of the batch in one parent flow run, their steps side by side on the
    workers; each model's result is its own (one that cannot start is reported alone, the others still run), and
    the parent's log (at INFO) says when each ended. The models after the first are planned by the parent while
    the first one's steps run: the one that cannot start is among its parameters and its log says why."""
    import shutil

    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    _s3_env(monkeypatch)
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "batch" / "pair.yaml").write_text(
        "recipes: [gguf_q8_0]\nmodels:\n"
        "  - {model: tiny_llama, overrides: [model.name=batch-a]}\n"
        "  - {model: local, overrides: [model.name=batch-gone, model.path=/nonexistent/llama]}\n"
        "  - {model: tiny_llama, overrides: [model.name=batch-b]}\n")

    def parents(name: str) -> list:
        with cluster.client() as client:
            return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))

    pipelines_before = len(parents("quantmill-pipeline"))
    home = cluster.root / "batcher"
    home.mkdir()
    proc = subprocess.run(_cli("batch", "pair", "--config-dir", str(conf), "--json",
                               *cluster.overrides(f"store.cache_dir={home / 'cache'}", "validate.enabled=false")),
                          cwd=home, capture_output=True,
                          env={**cluster.env, "PREFECT_HOME": str(home / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO"},
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr  # one run of the batch cannot start: reported alone
    results = json.loads(proc.stdout)["results"]
    (gone,) = [r for r in results if "batch-gone" in r["id"]]
    assert not gone["ok"] and "directory /nonexistent/llama does not exist; fix model.path" in gone["error"]
    results = [r for r in results if r is not gone]
    assert len(results) == 2 and all(r["ok"] for r in results), results
    assert all(r["ran"] + r["cached"] == 3 for r in results), results  # download, convert, quantize each

    (parent,) = parents("quantmill-batch")
    assert parent.state.is_completed() and len(parents("quantmill-pipeline")) == pipelines_before
    with cluster.client() as client:
        tasks = [t for t in client.read_task_runs() if t.flow_run_id == parent.id]
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks])))
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent.id])))]
    assert children and all(c.state.is_completed() and c.work_pool_name == "cpu" for c in children)
    assert len(children) == sum(t.name.startswith("cpu: ") for t in tasks) == 2  # a dispatch per model
    assert {"batch-a: completed", "batch-b: completed"} <= set(logs), logs
    assert [c["model"]["name"] for c in parent.parameters["configs"]] == ["batch-a", "batch-gone", "batch-b"]
    assert [m for m in logs if m.startswith("batch-gone: ")] == [f"batch-gone: refused: {gone['error']}"], logs


def test_a_batch_parent_keeps_at_most_queue_ahead_step_runs_waiting_for_a_worker(cluster, monkeypatch, tmp_path):
    """With infra.queue_ahead=1 the parent of a three-model batch sends a step run only when no other of its step
    runs is still waiting for a worker: read back from the server, each step run was created after every earlier
    one had started; all three complete."""
    import shutil

    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentTaskRunId

    _s3_env(monkeypatch)
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "batch" / "three.yaml").write_text(
        "recipes: [gguf_q8_0]\nmodels:\n" + "".join(
            f"  - {{model: tiny_llama, overrides: [model.name=ahead-{x}]}}\n" for x in "abc"))
    home = cluster.root / "ahead"
    home.mkdir()
    proc = subprocess.run(_cli("batch", "three", "--config-dir", str(conf), "--json",
                               *cluster.overrides(f"store.cache_dir={home / 'cache'}", "validate.enabled=false",
                                                  "infra.queue_ahead=1")),
                          cwd=home, capture_output=True, env={**cluster.env, "PREFECT_HOME": str(home / "prefect")},
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["ok"] for r in json.loads(proc.stdout)["results"]] == [True] * 3

    with cluster.client() as client:
        batches = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["quantmill-batch"])))
        (parent,) = [r for r in batches if r.parameters["configs"][0]["model"]["name"] == "ahead-a"]
        tasks = [t for t in client.read_task_runs() if t.flow_run_id == parent.id]
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks])))
    done = [(c.state_type.value, c.state.message) for c in children]  # 3 steps where the download was not cached
    assert len(done) == 3 and set(done) <= {("COMPLETED", "2 step(s) done"), ("COMPLETED", "3 step(s) done")}, done
    children.sort(key=lambda c: c.created)
    for later in children[1:]:
        waiting = [c.name for c in children if c.created < later.created and c.start_time > later.created]
        assert waiting == [], (later.name, waiting)


def test_a_step_run_is_one_api_call_and_a_deployment_made_again_is_found(cluster):
    """Outside a flow run a step run is one request (the deployment's id is the one the check read; in a flow run
    a second makes the task run standing for it); when the deployment was deleted and made again (a new id), the
    next step run goes to the new one."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from quantmill.prefect import deploy

    infra = _compose().infra  # deploy(names=["idle"]): a pool no worker serves, where runs stay Scheduled
    sent: list[str] = []
    send = httpx.Client.send

    def counted(self, request, *args, **kwargs):
        response = send(self, request, *args, **kwargs)  # raising (a timeout): Prefect's client sends it again
        # Not counted: a new client's first request (a dispatch task's client is not new), and answers Prefect's
        # client itself retries (a busy server's 503 or 408; seen in CI: the same create sent four times)
        if request.url.path != "/api/csrf-token" and response.status_code not in (408, 429, 502, 503):
            sent.append(f"{request.method} {request.url.path}")
        return response

    with temporary_settings({PREFECT_API_URL: cluster.url}):
        deploy.deploy(infra, names=["idle"])
        deploy.check_deployments(["idle"])
        with cluster.client() as client:
            first_id = client.read_deployment_by_name("quantmill-step/idle").id

        def make(name: str) -> str:
            sent.clear()
            httpx.Client.send = counted
            try:
                return deploy.create_step_run("idle", parameters={"specs": [], "inputs": {}, "store": {}}, name=name,
                                              tags=["quantmill", "pool:idle"], idempotency_key=name)
            finally:
                httpx.Client.send = send

        one = make("one")
        assert sent == [f"POST /api/deployments/{first_id}/create_flow_run"]  # not in a flow run: no stand-in task run
        with cluster.client() as client:
            runs = [client.read_flow_run(one)]
            client.delete_deployment(first_id)  # and its runs
        deploy.deploy(infra, names=["idle"])
        two = make("two")
        with cluster.client() as client:
            second_id = client.read_deployment_by_name("quantmill-step/idle").id
            runs.append(client.read_flow_run(two))
            client.delete_deployment(second_id)
    assert second_id != first_id
    assert sent == [f"POST /api/deployments/{first_id}/create_flow_run", "GET /api/deployments/name/quantmill-step/idle",
                    f"POST /api/deployments/{second_id}/create_flow_run"]
    assert [(r.name, r.deployment_id, r.work_pool_name, r.state_type.value) for r in runs] == [
        ("one", first_id, "idle", "SCHEDULED"), ("two", second_id, "idle", "SCHEDULED")]


# -- bad input, refused before anything runs -----------------------------------------------------------------
def _compose(*extra: str):
    from quantmill.config import compose

    return compose(["infra=prefect", "publish.enabled=false", *extra], conf_dir=CONF)


@pytest.mark.parametrize("stream", [True, False], ids=["event stream", "no event stream"])
def test_parents_hear_their_step_runs_end_through_one_waiter(cluster, monkeypatch, stream):
    """Runs waited for at once from many threads (parents in one process) are watched by one waiter: their ends
    are heard from the server's event stream as they happen, or without a stream (a proxy that refuses
    websockets) by its reads of the API, one read for all of them."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import prefect.events.clients
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Failed

    from quantmill.prefect import waiting

    @flow(name="quantmill-test-ends-later")
    def ends_later():
        pass

    if not stream:
        def refused(**_):
            raise OSError("websocket refused")

        monkeypatch.setattr(prefect.events.clients, "get_events_subscriber", refused)
    monkeypatch.setattr(waiting.RunWaiter, "_by_server", {})  # a waiter of its own, started with or without the stream
    with temporary_settings(updates={PREFECT_API_URL: cluster.url}):
        with get_client(sync_client=True) as client:
            run_ids = [str(client.create_flow_run(ends_later).id) for _ in range(6)]

        def end():
            with temporary_settings(updates={PREFECT_API_URL: cluster.url}), get_client(sync_client=True) as c:
                for i, run_id in enumerate(run_ids):
                    c.set_flow_run_state(run_id, Completed() if i % 2 else Failed(), force=True)

        def end_once_all_wait():  # the runs end while all six waits are pending (an event, not a delay)
            _wait(lambda: any(len(w.pending) == len(run_ids) for w in list(waiting.RunWaiter._by_server.values())),
                  60, "six pending waits")
            end()

        threading.Thread(target=end_once_all_wait, daemon=True).start()
        start = time.monotonic()

        def wait(run_id):
            with temporary_settings(updates={PREFECT_API_URL: cluster.url}):
                # with the stream, no read of the API after the first would come within 30 s
                return waiting.wait_for_run(run_id, poll_seconds=30.0 if stream else 0.2)

        with ThreadPoolExecutor(len(run_ids)) as pool:
            states = list(pool.map(wait, run_ids))
        elapsed = time.monotonic() - start
    assert states == ["FAILED", "COMPLETED"] * 3
    assert elapsed < 15
    (waiter,) = waiting.RunWaiter._by_server.values()
    assert waiter.pending == {}
    # one read per arriving wait at most, then: with the stream, a read when it announced ends (the 30 s interval
    # never came); without, a read every 0.2 s for all six, not six reads every 0.2 s
    if stream:
        assert waiter.reads <= 2 * len(run_ids), waiter.reads
    else:
        assert waiter.reads <= len(run_ids) + elapsed / 0.2 + 1, (waiter.reads, elapsed)


def test_capability_no_pool_offers_names_it_and_the_pools(tmp_path):
    from quantmill.errors import PreflightError
    from quantmill.plan.build import plan
    from quantmill.store import open_store

    cfg = _compose("recipe=[mlx_4bit]", "~infra.pools.mac", f"store.root={tmp_path / 'store'}")
    with pytest.raises(PreflightError) as e:
        plan(cfg, open_store(cfg.store))
    assert str(e.value) == ("step convert:mlx-float16 needs capability 'mlx', which no pool offers (configured: cpu "
                            "[cpu, llamacpp]; cuda [cuda]); add a pool offering it to conf/infra/, or run embedded")


def test_unreachable_server_says_how_to_run_embedded(tmp_path):
    from quantmill.prefect.launch import run_config
    from quantmill.prefect.settings import ServerError

    cfg = _compose("recipe=[gguf_q8_0]", f"infra.api_url=http://127.0.0.1:{_free_port()}/api",
                   f"store.root={tmp_path / 'store'}")
    with pytest.raises(ServerError) as e:
        run_config(cfg)
    message = str(e.value)
    assert "\n" not in message and "is unreachable" in message and "run embedded with infra=embedded" in message


def test_missing_bucket_is_one_line_before_any_server_call(tmp_path, s3, monkeypatch):
    from quantmill.errors import StoreError
    from quantmill.prefect.launch import run_config

    _s3_env(monkeypatch)
    cfg = _compose("recipe=[gguf_q8_0]", "store=s3", "store.bucket=no-such-bucket", f"store.endpoint_url={s3}",
                   f"store.cache_dir={tmp_path / 'cache'}", f"infra.api_url=http://127.0.0.1:{_free_port()}/api")
    with pytest.raises(StoreError) as e:
        run_config(cfg)
    assert "bucket 'no-such-bucket' does not exist; create it or fix store.bucket" in str(e.value)


def test_worker_refuses_a_pool_this_machine_cannot_serve(tmp_path):
    from quantmill.toolchain.hardware import cuda_gpus

    if cuda_gpus():
        pytest.skip("this machine has CUDA; the refusal needs one without")
    proc = subprocess.run(_cli("worker", "--pool", "cuda", "infra.api_url=http://127.0.0.1:1/api"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("quantmill: error: this machine cannot serve pool 'cuda': capability 'cuda': torch "
                                   "sees no CUDA device here (no GPU, no driver, or a CPU-only torch); start this "
                                   "worker on a GPU machine")
    proc = subprocess.run(_cli("worker", "--pool", "gpu"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pool 'gpu' is not configured; configured: cpu [cpu, llamacpp]; cuda [cuda]; " \
                                    "mac [mlx]" in proc.stderr


@pytest.mark.parametrize("capability, says", [
    ("llamacpp-cuda", "has no CUDA backend (GGML_NATIVE=OFF BUILD_SHARED_LIBS=ON); rebuild it with "
                      "LLAMA_CPP_CUDA_ARCHS=\"80;86;89;90\" make llama-cpp, or drop llamacpp-cuda from the pool"),
    ("onnx-cuda", "here has no CUDA execution provider (it has "),
])
def test_worker_refuses_a_gpu_capability_without_its_cuda_build(tmp_path, capability, says):
    """A pool offering llama.cpp or ONNX Runtime on CUDA, started on a machine whose builds are CPU-only."""
    from quantmill.toolchain.llamacpp import locate

    if locate().cuda:
        pytest.skip("this machine's llama.cpp has CUDA; the refusal needs a CPU build")
    proc = subprocess.run(_cli("worker", "--pool", "cpu", f"infra.pools.cpu.capabilities=[cpu,{capability}]",
                               "infra.api_url=http://127.0.0.1:1/api"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"quantmill: error: this machine cannot serve pool 'cpu': capability "
                                                f"'{capability}': ") and says in line, line


def test_steps_that_run_faster_on_a_gpu_go_to_a_pool_with_the_cuda_builds(tmp_path):
    """llama.cpp's imatrix and validations, and validations of ONNX models built for CUDA, go to the pool offering
    llamacpp-cuda / onnx-cuda; the rest stays where it was. Without such a pool nothing changes."""
    from quantmill.plan.build import plan
    from quantmill.store import open_store

    recipes = "recipe=[gguf_q4_k_m,onnx_int4_cpu,onnx_int4_cuda]"
    gpu = "infra.pools.cuda.capabilities=[cuda,llamacpp,llamacpp-cuda,onnx,onnx-cuda]"
    cfg = _compose(recipes, "recipe.gguf_q4_k_m.imatrix=true", "infra.pools.cpu.capabilities=[cpu,llamacpp,onnx]",
                   gpu, f"store.root={tmp_path / 'store'}")
    routes = plan(cfg, open_store(cfg.store)).routes
    assert {s: p for s, p in routes.items() if p == "cuda"} == {
        s: "cuda" for s in ("calibrate:imatrix-gguf", "validate:reference-gguf", "validate:gguf_q4_k_m",
                           "validate:onnx_int4_cuda")}
    assert routes["quantize:gguf_q4_k_m"] == routes["validate:onnx_int4_cpu"] == "cpu"
    assert routes["validate:reference-onnx"] == "cpu"  # the FP32 reference is a CPU model
    cfg = _compose(recipes, "recipe.gguf_q4_k_m.imatrix=true", "infra.pools.cpu.capabilities=[cpu,llamacpp,onnx]",
                   f"store.root={tmp_path / 'store'}")
    assert set(plan(cfg, open_store(cfg.store)).routes.values()) == {"cpu"}  # the cuda pool offers [cuda] only


def test_worker_with_other_tool_versions_refuses_the_spec():
    from quantmill.toolchain.versions import check_tools, package_version

    assert check_tools({"numpy": package_version("numpy")}) == []
    assert check_tools({"numpy": "1.0.0", "machine": "pool cpu"}, pool="gpu") == [
        "machine pool gpu (planned: pool cpu)", f"numpy {package_version('numpy')} (planned: 1.0.0)"]
