"""The local store: atomic commits with provenance last, verification, concurrency, and running out of space."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from quantmill import constants as C
from quantmill.digest import sha256_file
from quantmill.errors import StoreFullError
from quantmill.store import provenance
from quantmill.store.local import LocalStore

KEY = "ab" * 32


def _statement(key: str):
    def build(subjects, digest):
        return provenance.statement(
            subjects=subjects, artifact_digest=digest, key=key, step="quantize", spec_id="quantize:x",
            impl_version="1", config={"quant_type": "Q4_K_M", "hf_token": "hf_secret_value"}, inputs={},
            dependencies=[], tools={"llama.cpp": "test"}, run=provenance.RunInfo(), started="t0", finished="t1")
    return build


def commit_payload(store: LocalStore, key: str, payload: bytes):
    with store.stage(key) as staging:
        (staging.files / "model.gguf").write_bytes(payload)
        (staging.files / "sub").mkdir()
        (staging.files / "sub" / "meta.json").write_text('{"a": 1}')
        return store.commit(staging, _statement(key))


def test_commit_then_lookup_and_verify(tmp_path):
    store = LocalStore(tmp_path)
    assert store.lookup(KEY) is None
    ref = commit_payload(store, KEY, b"weights" * 1000)
    assert store.lookup(KEY) == ref
    files = store.files(ref)
    assert sorted(p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()) == \
        ["model.gguf", "sub/meta.json"]
    stmt = store.statement(KEY)
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    assert {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]} == {
        "model.gguf": sha256_file(files / "model.gguf"), "sub/meta.json": sha256_file(files / "sub/meta.json")}
    assert store.verify(KEY) == []
    assert list((tmp_path / C.STAGING_DIR).iterdir()) == []
    assert store.key_for_digest(ref.digest) == KEY


def test_secrets_are_redacted_from_provenance(tmp_path):
    store = LocalStore(tmp_path)
    commit_payload(store, KEY, b"x")
    text = (tmp_path / C.OBJECTS_DIR / KEY / C.PROVENANCE_FILE).read_text()
    assert "hf_secret_value" not in text
    assert json.loads(text)["predicate"]["buildDefinition"]["externalParameters"]["config"]["hf_token"] == "<redacted>"


@pytest.mark.parametrize("key", ["hf_token", "HF_TOKEN", "token", "aws_secret_access_key", "apiKey", "api-key",
                                 "password", "db_credentials", "private_key"])
def test_a_secrets_name_is_redacted(key):
    from quantmill.store.provenance import redact

    assert redact({"outer": {key: "s3cr3t"}}) == {"outer": {key: "<redacted>"}}


@pytest.mark.parametrize("key", ["max_tokens", "tokenizer_exact", "tokens", "n_tokens_scored", "key", "signed_by"])
def test_a_setting_whose_name_only_contains_a_secret_word_is_kept(key):
    from quantmill.store.provenance import redact

    assert redact({key: 128}) == {key: 128}


def test_failed_step_leaves_nothing_visible(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.stage(KEY) as staging:
            (staging.files / "half.gguf").write_bytes(b"partial")
            raise RuntimeError("tool crashed")
    assert store.lookup(KEY) is None
    assert list((tmp_path / C.OBJECTS_DIR).iterdir()) == []
    assert list((tmp_path / C.STAGING_DIR).iterdir()) == []


def test_tampered_file_fails_verification_and_names_it(tmp_path):
    store = LocalStore(tmp_path)
    ref = commit_payload(store, KEY, b"weights")
    target = store.files(ref) / "model.gguf"
    target.write_bytes(b"Weights")
    problems = store.verify(KEY)
    assert len(problems) == 1 and problems[0].startswith("model.gguf: sha256 ")
    (store.files(ref) / "extra.bin").write_bytes(b"!")
    assert "extra.bin: not in the provenance record" in store.verify(KEY)


def test_concurrent_commits_of_one_key_leave_one_artifact(tmp_path):
    store = LocalStore(tmp_path)
    refs, errors = [], []
    barrier = threading.Barrier(4)

    def worker():
        try:
            with store.stage(KEY) as staging:
                (staging.files / "model.gguf").write_bytes(b"same bytes")
                barrier.wait()
                refs.append(store.commit(staging, _statement(KEY)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.digest for r in refs}) == 1 and len(refs) == 4
    assert os.listdir(tmp_path / C.OBJECTS_DIR) == [KEY]
    assert list((tmp_path / C.STAGING_DIR).iterdir()) == []
    assert store.verify(KEY) == []


def test_shards_are_hashed_while_the_next_is_written_and_the_commit_trusts_only_unchanged_ones(tmp_path, monkeypatch):
    """A checkpoint written shard by shard (safetensors writes each to a temporary name, then renames it): each
    finished shard is hashed while the next is written; the commit hashes only what was not hashed ahead, or what
    changed since (here a shard rewritten after its hash), and records the true digests."""
    import numpy as np
    from safetensors.numpy import save_file

    from quantmill import digest

    store = LocalStore(tmp_path)
    rng = np.random.default_rng(0)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with store.stage(KEY) as staging:
        with digest.HashAhead(staging.files, store.digest_cache(), ("*.safetensors",), poll_seconds=0.02) as ahead:
            for name in names[:2]:
                save_file({"w": rng.standard_normal(1 << 19).astype(np.float32)}, str(staging.files / name))
            for _ in range(200):  # the first shard is hashed while the writer is still busy
                if names[0] in ahead.hashed:
                    break
                threading.Event().wait(0.01)
            hashed_before_the_last = list(ahead.hashed)
            save_file({"w": rng.standard_normal(1 << 19).astype(np.float32)}, str(staging.files / names[2]))
        assert names[0] in hashed_before_the_last and names[2] not in hashed_before_the_last
        assert not [p for p in staging.files.iterdir() if p.name.startswith(".")]  # no temporary file was seen
        # a shard rewritten after its hash (same size, other bytes) must not keep the stale digest
        threading.Event().wait(0.02)  # a timestamp tick apart
        save_file({"w": rng.standard_normal(1 << 19).astype(np.float32)}, str(staging.files / names[0]))
        (staging.files / "config.json").write_text("{}")
        hashed_at_commit = []
        real = digest.sha256_file
        monkeypatch.setattr(digest, "sha256_file", lambda path, *a: hashed_at_commit.append(path.name) or real(path, *a))
        ref = store.commit(staging, _statement(KEY))
    files = store.files(ref)
    recorded = {s["name"]: s["digest"]["sha256"] for s in store.statement(KEY)["subject"]}
    assert recorded == {name: real(files / name) for name in [*names, "config.json"]}
    assert sorted(hashed_at_commit) == sorted({"config.json", names[0]} | set(names) - set(ahead.hashed))
    assert store.verify(KEY) == []


def test_quota_refuses_commit_without_partial_artifact(tmp_path):
    store = LocalStore(tmp_path, quota_bytes=10_000)
    with pytest.raises(StoreFullError) as e:
        commit_payload(store, KEY, b"x" * 20_000)
    assert "over its quota of 10000 bytes" in str(e.value) and "nothing was committed" in str(e.value)
    assert list((tmp_path / C.OBJECTS_DIR).iterdir()) == []
    assert list((tmp_path / C.STAGING_DIR).iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_a_clear_error_and_leaves_no_partial_artifact(tiny_tmpfs):
    store = LocalStore(tiny_tmpfs / "store")
    with pytest.raises(StoreFullError) as e:
        commit_payload(store, KEY, b"x" * (2 << 20))
    assert "out of disk space" in str(e.value) and "nothing was committed" in str(e.value)
    assert store.lookup(KEY) is None
    assert list((tiny_tmpfs / "store" / C.OBJECTS_DIR).iterdir()) == []
    assert list((tiny_tmpfs / "store" / C.STAGING_DIR).iterdir()) == []
