"""The S3 store against a real HTTP S3 endpoint (moto's server on 127.0.0.1), two workers with separate caches."""

from __future__ import annotations

import pytest

from quantmill.errors import IntegrityError, StoreError
from quantmill.store import provenance
from quantmill.store.s3 import S3Store

KEY = "cd" * 32


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    return s3_endpoint


@pytest.fixture
def bucket(endpoint, monkeypatch, request):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"qm-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def _worker(endpoint, bucket, tmp_path, name):
    return S3Store(bucket, "team", endpoint_url=endpoint, cache_dir=tmp_path / name)


def _statement(key):
    def build(subjects, digest):
        return provenance.statement(subjects=subjects, artifact_digest=digest, key=key, step="quantize",
                                    spec_id="quantize:x", impl_version="1", config={}, inputs={}, dependencies=[],
                                    tools={}, run=provenance.RunInfo(), started="t0", finished="t1")
    return build


def _commit(store, payload, key=KEY):
    with store.stage(key) as staging:
        (staging.files / "model.gguf").write_bytes(payload)
        return store.commit(staging, _statement(key))


def test_one_worker_commits_another_fetches_verified_bytes(endpoint, bucket, tmp_path):
    a, b = _worker(endpoint, bucket, tmp_path, "a"), _worker(endpoint, bucket, tmp_path, "b")
    payload = bytes(range(256)) * 100_000  # 25.6 MB: multipart upload
    ref = _commit(a, payload)
    found = b.lookup(KEY)
    assert found == ref and ref.uri == f"s3://{bucket}/team/objects/{KEY}"
    assert (b.files(found) / "model.gguf").read_bytes() == payload
    assert b.verify(KEY) == []


def test_nothing_is_visible_until_the_provenance_record_is_written(endpoint, bucket, tmp_path, monkeypatch):
    import boto3

    a = _worker(endpoint, bucket, tmp_path, "a")
    put_object = a.client.put_object

    def killed_before_the_marker(**kw):  # file uploads go through; the worker dies before the commit marker
        if "IfNoneMatch" in kw:
            raise RuntimeError("worker killed")
        return put_object(**kw)

    monkeypatch.setattr(a.client, "put_object", killed_before_the_marker)
    with pytest.raises(RuntimeError):
        _commit(a, b"partial")
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    assert any(o["Key"].endswith("model.gguf") for o in listed)  # the file made it up ...
    assert _worker(endpoint, bucket, tmp_path, "b").lookup(KEY) is None  # ... but no artifact exists


def test_a_losing_writer_with_other_bytes_never_touches_the_winners_files(endpoint, bucket, tmp_path):
    a, b = _worker(endpoint, bucket, tmp_path, "a"), _worker(endpoint, bucket, tmp_path, "b")
    first = _commit(a, b"measured 41.7 tokens/s")
    second = _commit(b, b"measured 39.2 tokens/s")  # same key, different bytes (a re-measured validation)
    assert second == first
    auditor = _worker(endpoint, bucket, tmp_path, "auditor")
    assert auditor.verify(KEY) == []
    assert (auditor.files(first) / "model.gguf").read_bytes() == b"measured 41.7 tokens/s"


def _file_object(endpoint, bucket, name):
    import boto3

    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    return next(o["Key"] for o in listed if o["Key"].endswith(name))


def test_altered_object_is_detected_on_download(endpoint, bucket, tmp_path):
    import boto3

    ref = _commit(_worker(endpoint, bucket, tmp_path, "a"), b"original weights")
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket=bucket, Key=_file_object(endpoint, bucket, "model.gguf"), Body=b"Original weights")
    b = _worker(endpoint, bucket, tmp_path, "b")
    with pytest.raises(IntegrityError, match=r"model.gguf has sha256 .* the object was altered: not used"):
        b.files(ref)
    assert not (tmp_path / "b" / "objects" / KEY / "files" / "model.gguf").exists()


def test_a_small_file_is_fetched_once_per_store_and_only_verified_bytes_are_kept(endpoint, bucket, tmp_path):
    """``read_file`` (results, cards) keeps what it verified: a second read asks the bucket nothing; bytes altered
    in the bucket afterwards are refused by a store that reads them, and never replace the kept ones."""
    import boto3

    ref = _commit(_worker(endpoint, bucket, tmp_path, "a"), b"original weights")
    b = _worker(endpoint, bucket, tmp_path, "b")
    reads: list[str] = []
    b.client.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: reads.append(params["Key"]))
    assert b.read_file(ref, "model.gguf") == b.read_file(ref, "model.gguf") == b"original weights"
    assert [k.rsplit("/", 1)[-1] for k in reads] == ["provenance.json", "model.gguf"]
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket=bucket, Key=_file_object(endpoint, bucket, "model.gguf"), Body=b"Original weights")
    with pytest.raises(IntegrityError, match=r"model.gguf differs from its provenance; not used"):
        _worker(endpoint, bucket, tmp_path, "c").read_file(ref, "model.gguf")
    assert b.read_file(ref, "model.gguf") == b"original weights" and len(reads) == 2


def test_missing_bucket_is_one_line(endpoint, bucket, tmp_path):
    store = S3Store("no-such-bucket", endpoint_url=endpoint, cache_dir=tmp_path / "c")
    with pytest.raises(StoreError) as e:
        _commit(store, b"x")
    assert str(e.value) == (f"s3://no-such-bucket ({endpoint}): bucket 'no-such-bucket' does not exist; create it "
                            f"or fix store.bucket")


def test_pipeline_runs_into_a_bucket_and_a_second_worker_reuses_it(endpoint, bucket, tmp_path):
    """The whole GGUF path with store.kind=s3; a second worker (own cache) plans every step as cached."""
    from quantmill.plan.build import plan
    from quantmill.plan.spec import HIT, resolve
    from quantmill.store import open_store
    from tests.conftest import compose_in, run_inline

    s3 = ("store.kind=s3", f"store.bucket={bucket}", f"store.endpoint_url={endpoint}", "publish.enabled=false",
          "recipe=[gguf_q8_0]")
    _, _, results = run_inline(compose_in(tmp_path / "w1", *s3, f"store.cache_dir={tmp_path / 'w1-cache'}"))
    assert results["validate:gguf_q8_0"].result["status"] == "passed"
    cfg = compose_in(tmp_path / "w2", *s3, f"store.cache_dir={tmp_path / 'w2-cache'}")
    store = open_store(cfg.store)
    assert set(resolve(plan(cfg, store), store).status.values()) == {HIT}
    quant = store.files(store.lookup(results["quantize:gguf_q8_0"].ref.key))
    assert (quant / "model-q8_0.gguf").stat().st_size > 1 << 20


def test_a_batch_plans_on_one_store_and_asks_the_bucket_once_for_what_its_runs_share(endpoint, bucket, tmp_path):
    """The runs of a batch (three models from one source, so one shared download) are planned on one opened
    store: the download's record is read from the bucket once, not once per run; each run's own lookup still goes
    to the bucket. Opened apart, every run reads it again."""
    from quantmill.execute import run_step
    from quantmill.plan.build import plan
    from quantmill.plan.spec import HIT, MISS
    from quantmill.prefect import launch
    from quantmill.store import open_store
    from tests.conftest import compose_in

    s3 = ("store.kind=s3", f"store.bucket={bucket}", f"store.endpoint_url={endpoint}", "publish.enabled=false",
          "validate.enabled=false", "recipe=[gguf_q8_0]", f"store.cache_dir={tmp_path / 'cache'}")
    cfgs = [compose_in(tmp_path, *s3, f"model.name=tiny-{i}") for i in range(3)]
    store = open_store(cfgs[0].store)
    download = plan(cfgs[0], store).specs["download"]
    record = run_step(download, {}, store).ref.key

    def planned_reading(stores):
        import boto3

        reads: list[str] = []
        boto3.setup_default_session()  # every client made from here on (the stores' own) reports its GetObjects
        boto3.DEFAULT_SESSION.events.register("before-parameter-build.s3.GetObject",
                                              lambda params, **_: reads.append(params["Key"]))
        opened = []
        for cfg in cfgs:
            _, store, _, resolution = launch.planned(cfg, stores=stores)
            assert resolution.status[download.id] == HIT and resolution.status["convert:gguf-f16"] == MISS
            opened += [store] if all(store is not s for s in opened) else []
        boto3.setup_default_session()
        return reads, opened

    reads, opened = planned_reading({})
    assert len(opened) == 1 and sum(record in key for key in reads) == 1 and len(reads) == 1 + 3
    reads, opened = planned_reading(None)
    assert len(opened) == 3 and sum(record in key for key in reads) == 3


def test_refused_credentials_are_one_line_without_the_secret(tmp_path):
    """A run into a bucket whose endpoint refuses the keys (moto's server checking them against its IAM, where none
    exist): the command ends with one line naming the refusal and the variables to fix; no traceback, and the
    secret appears nowhere in its output."""
    import os
    import subprocess
    import sys

    from tests.conftest import QUICK
    from tests.harness import cli, free_port, killpg, wait

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    secret = "wJalrXUtnFEMI-not-a-key-moto-knows"
    try:
        wait(lambda: _answers(endpoint), 60, "moto's server")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAQMNOTKNOWN", "AWS_SECRET_ACCESS_KEY": secret,
               "AWS_DEFAULT_REGION": "us-east-1", "PREFECT_HOME": str(tmp_path / "prefect")}
        done = subprocess.run(cli("run", "store=s3", "store.bucket=team", f"store.endpoint_url={endpoint}",
                                  f"store.cache_dir={tmp_path / 'cache'}", "publish.enabled=false", "recipe=[gguf_q8_0]",
                                  *QUICK),
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        killpg(server)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output[-3000:]
    lines = [line for line in done.stderr.splitlines() if "credentials refused" in line]
    assert len(lines) == 1 and "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in lines[0], done.stderr[-3000:]
    assert secret not in output


def _answers(endpoint: str) -> bool:
    import httpx

    try:
        httpx.get(endpoint, timeout=2)
        return True
    except httpx.TransportError:
        return False


def test_a_worker_waits_for_the_lease_holder_and_reuses_its_commit(endpoint, bucket, tmp_path):
    """Two workers reach the same key: the second waits on the bucket's lease (its conditional write refused) and
    then finds the first one's artifact instead of computing it again."""
    import threading

    from botocore.exceptions import ClientError

    a, b = _worker(endpoint, bucket, tmp_path, "a"), _worker(endpoint, bucket, tmp_path, "b")
    refused = threading.Event()
    put_object = b.client.put_object

    def watched(**kw):
        try:
            return put_object(**kw)
        except ClientError:
            refused.set()
            raise

    b.client.put_object = watched
    computed = []

    def second():
        with b.key_lock(KEY):
            if b.lookup(KEY) is None:
                computed.append("b")
                _commit(b, b"b's bytes")

    with a.key_lock(KEY):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert refused.wait(30), "b never tried the lease"
        assert waiter.is_alive()  # b waits while a holds the lease
        computed.append("a")
        first = _commit(a, b"a's bytes")
    waiter.join(60)
    assert not waiter.is_alive() and computed == ["a"]
    assert (b.files(b.lookup(KEY)) / "model.gguf").read_bytes() == b"a's bytes" and b.lookup(KEY) == first
    import boto3

    left = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix="team/state/leases/")
    assert left.get("KeyCount", 0) == 0  # the lease is gone with its holder's block


def test_a_dead_workers_lease_is_taken_over(endpoint, bucket, tmp_path):
    import boto3

    from quantmill.store.s3_lease import lease

    client = boto3.client("s3", endpoint_url=endpoint)
    key = "team/state/leases/" + KEY
    client.put_object(Bucket=bucket, Key=key, Body=b'{"host": "gone", "pid": 1}')  # never renewed, never released
    entered = []
    with lease(client, bucket, key, done=lambda: False, term=0.0, poll=0.05):  # older than a zero term: expired
        entered.append(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert entered and b"gone" not in entered[0]
