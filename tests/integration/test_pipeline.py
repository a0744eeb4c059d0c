"""The default pipeline end to end through the real embedded Prefect flow, and what its cache guarantees."""

from __future__ import annotations

import shutil

import pytest

from quantmill import constants as C
from quantmill.backends.llamacpp_runtime import LlamaCppRuntime
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.outcome import CACHED, RAN
from quantmill.plan.build import plan
from quantmill.plan.spec import HIT, MISS, PENDING, resolve
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from quantmill.store.local import ArtifactRef
from tests.conftest import compose_in, plant, run_inline

pytestmark = pytest.mark.slow


def _statuses(cfg):
    store = open_store(cfg.store)
    return resolve(plan(cfg, store), store).status


def test_default_run_publishes_q8_0_and_q4_k_m(default_run):
    root, cfg, outcomes = default_run
    assert all(o.ok for o in outcomes), [(o.spec_id, o.error) for o in outcomes]
    assert {o.status for o in outcomes} == {RAN}
    registry = LocalRegistry(root / "store" / C.REGISTRY_DIR)
    entries = {e["name"]: e for e in registry.entries()}
    assert set(entries) == {"tiny-llama-gguf_q8_0", "tiny-llama-gguf_q4_k_m"}
    assert entries["tiny-llama-gguf_q4_k_m"]["quant_type"] == "Q4_K_M"
    assert 4.5 < entries["tiny-llama-gguf_q4_k_m"]["bits_per_weight"] < 5.5
    assert 8.4 < entries["tiny-llama-gguf_q8_0"]["bits_per_weight"] < 8.6
    card = registry.card("tiny-llama-gguf_q4_k_m", 1)
    for line in ("base_model: tiny-llama", "base_model_relation: quantized", "quantized_by: quantmill", "- q4_k_m"):
        assert line in card


def test_published_ggufs_load_in_pinned_llama_cpp_and_generate(default_run):
    root, _, _ = default_run
    store = open_store(compose_in(root).store)
    from tokenizers import Tokenizer

    from quantmill.backends.local_source import BUNDLED_ROOT

    prompt = [1] + Tokenizer.from_file(str(BUNDLED_ROOT / "tiny-llama" / "tokenizer.json")).encode(
        "The miller carried", add_special_tokens=False).ids
    runtime = LlamaCppRuntime()
    texts = {}
    for entry in LocalRegistry(root / "store" / C.REGISTRY_DIR).entries():
        files = store.verified_files(ArtifactRef(entry["artifact"]["key"], entry["artifact"]["digest"], ""))
        with runtime.load(files, n_ctx=128) as model:
            ids = runtime.generate(model, prompt, 12)  # greedy; may stop early at end-of-sequence
            assert 3 <= len(ids) <= 12
            texts[entry["quant_type"]] = runtime.detokenize(model, ids)
    # the tiny model learned its corpus: both quants continue the sentence with whole words of it (random or broken
    # weights string sub-word pieces together); the last word may be cut off by the token limit
    import re

    corpus = set(re.findall(r"[a-z]+", " ".join(p.read_text().lower() for p in (BUNDLED_ROOT / "text").glob("*.txt"))))
    for quant, text in texts.items():
        words = re.findall(r"[a-z]+", text.lower())[:-1]
        assert len(words) >= 2 and set(words) <= corpus, (quant, text, set(words) - corpus)


def test_every_artifact_verifies_against_its_provenance(default_run):
    root, _, outcomes = default_run
    store = open_store(compose_in(root).store)
    for o in outcomes:
        assert store.verify(o.key) == [], o.spec_id
        stmt = store.statement(o.key)
        subjects = {s["name"] for s in stmt["subject"]}
        assert C.RESULT_FILE in subjects
        params = stmt["predicate"]["buildDefinition"]
        assert params["internalParameters"]["cache_key"] == o.key
        assert params["externalParameters"]["step"] == o.step


def test_task_runs_are_recorded_in_prefect_and_in_provenance(default_run):
    from prefect.client.orchestration import get_client

    root, _, outcomes = default_run
    store = open_store(compose_in(root).store)
    run = next(b for b in store.statement(outcomes[-1].key)["predicate"]["runDetails"]["byproducts"]
               if b["name"] == "run")["annotations"]
    from quantmill.prefect.server import TEMPORARY

    # the run was recorded by this process's temporary API server, which outlives the run
    with get_client(sync_client=True, httpx_settings={"base_url": TEMPORARY.url}) as client:
        flow_run = client.read_flow_run(run["prefect_flow_run_id"])
        task_run = client.read_task_run(run["prefect_task_run_id"])
    assert flow_run.state.is_completed() and flow_run.name
    assert task_run.state.is_completed() and task_run.name == outcomes[-1].spec_id
    assert task_run.flow_run_id == flow_run.id


def test_second_run_executes_nothing(default_run):
    root, cfg, _ = default_run
    assert set(_statuses(cfg).values()) == {HIT}
    outcomes = run_config(cfg)
    assert {o.status for o in outcomes} == {CACHED}


def test_third_recipe_reuses_download_calibration_and_f16(default_run):
    root, _, _ = default_run
    status = _statuses(compose_in(root, "recipe=[gguf_q8_0,gguf_q4_k_m,gguf_q6_k]"))
    for shared in ("download", "calibrate:dataset", "convert:gguf-f16", "calibrate:imatrix-gguf",
                   "quantize:gguf_q4_k_m", "publish:gguf_q8_0"):
        assert status[shared] == HIT, shared
    assert status["quantize:gguf_q6_k"] == MISS
    assert status["validate:gguf_q6_k"] == PENDING and status["publish:gguf_q6_k"] == PENDING


def test_publish_setting_change_reruns_only_publish(tmp_path):
    cfg = compose_in(tmp_path, "recipe=[gguf_q8_0]")
    run_inline(cfg)
    changed = compose_in(tmp_path, "recipe=[gguf_q8_0]", "publish.tags=[team-a]")
    status = _statuses(changed)
    assert {k for k, v in status.items() if v != HIT} == {"publish:gguf_q8_0"}
    outcomes = run_config(changed)
    assert [o.spec_id for o in outcomes if o.status == RAN] == ["publish:gguf_q8_0"]
    # the same bytes with the same verdict: no new version (versions mean new bytes or a new verdict)
    registry = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR)
    assert registry.versions("tiny-llama-gguf_q8_0") == [1]
    assert "- team-a" not in registry.card("tiny-llama-gguf_q8_0", 1)


def _zero_tensor(path, name):
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    with open(path, "r+b") as f:
        f.seek(tensor.data_offset)
        f.write(b"\0" * int(tensor.n_bytes))


def test_broken_quant_fails_validation_and_is_not_published(tmp_path):
    """A Q8_0 whose output tensor (scales included) is zeroed: it loads, but generates one token forever."""
    cfg = compose_in(tmp_path)
    store, _, results = run_inline(compose_in(tmp_path, "validate.enabled=false", "publish.enabled=false"))
    good = results["quantize:gguf_q8_0"].ref
    broken_dir = tmp_path / "broken"
    shutil.copytree(store.files(good), broken_dir)
    _zero_tensor(broken_dir / "model-q8_0.gguf", "output.weight")
    plant(store, good.key, broken_dir)  # under the quantize step's key: the run validates it as its own

    outcomes = {o.spec_id: o for o in run_config(cfg)}
    assert outcomes["validate:gguf_q8_0"].status == RAN
    assert outcomes["validate:gguf_q8_0"].result["status"] == C.FAILED
    assert "generates" in outcomes["validate:gguf_q8_0"].result["failed"][0]
    assert not outcomes["validate:gguf_q8_0"].ok
    assert outcomes["publish:gguf_q8_0"].status == "failed"
    assert "failed validation: generates" in outcomes["publish:gguf_q8_0"].error
    assert outcomes["publish:gguf_q4_k_m"].ok  # the sibling is unaffected
    names = [e["name"] for e in LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).entries()]
    assert names == ["tiny-llama-gguf_q4_k_m"]

    # enforce=false publishes it, marked unvalidated in the entry and the card
    outcomes = {o.spec_id: o for o in run_config(compose_in(tmp_path, "validate.enforce=false"))}
    assert outcomes["publish:gguf_q8_0"].status == RAN
    registry = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR)
    assert registry.get("tiny-llama-gguf_q8_0")["validated"] is False
    assert "**Unvalidated**" in registry.card("tiny-llama-gguf_q8_0", 1)


def test_same_key_same_bytes_across_stores(tmp_path):
    """Two independent stores fed from two different directories holding the same model (two machines):
    every content artifact has the same key and the same digest."""
    from quantmill.backends.local_source import BUNDLED_ROOT

    runs = []
    for name in ("a", "b"):
        model = tmp_path / name / "models" / f"copy-{name}"
        shutil.copytree(BUNDLED_ROOT / "tiny-llama", model)
        runs.append(run_inline(compose_in(tmp_path / name, "model=local", f"model.path={model}", "model.name=tiny",
                                          "validate.enabled=false", "publish.enabled=false"))[2])
    a, b = runs
    assert a.keys() == b.keys()
    for spec_id in a:
        assert (a[spec_id].ref.key, a[spec_id].ref.digest) == (b[spec_id].ref.key, b[spec_id].ref.digest), spec_id


def test_local_source_is_hardlinked_and_an_in_place_edit_is_caught(tmp_path, tiny_model):
    from quantmill.errors import IntegrityError

    overrides = ("model=local", f"model.path={tiny_model}", "model.name=tiny", "recipe=[gguf_q8_0]",
                 "validate.enabled=false", "publish.enabled=false")
    store, _, results = run_inline(compose_in(tmp_path, *overrides))
    downloaded = store.files(results["download"].ref) / "model.safetensors"
    assert downloaded.stat().st_ino == (tiny_model / "model.safetensors").stat().st_ino
    assert store.verified_files(results["download"].ref) == downloaded.parent

    with open(tiny_model / "model.safetensors", "r+b") as f:  # edit the source in place: same inode
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    with pytest.raises(IntegrityError, match="model.safetensors does not match its provenance record"):
        store.verified_files(results["download"].ref)
    # the edited source is a new model: a new download key, copied afresh
    assert _statuses(compose_in(tmp_path, *overrides))["download"] == MISS


def test_copy_when_linking_is_off(tmp_path, tiny_model):
    store, _, results = run_inline(compose_in(
        tmp_path, "model=local", f"model.path={tiny_model}", "model.name=tiny", "recipe=[gguf_q8_0]",
        "validate.enabled=false", "publish.enabled=false", "store.link_sources=false"))
    downloaded = store.files(results["download"].ref) / "model.safetensors"
    assert downloaded.stat().st_ino != (tiny_model / "model.safetensors").stat().st_ino
    assert downloaded.read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_a_byte_flipped_in_a_cached_artifact_is_reported_rebuilt_and_the_good_bytes_published(tmp_path, capsys):
    """A cache hit is checked against its record before it is used: the damaged copy is set aside with one line
    naming it, the step runs again, and the registry's version holds the rebuilt (good) bytes."""
    import hashlib

    cfg = compose_in(tmp_path)
    first = {o.spec_id: o for o in run_config(cfg)}
    assert all(o.ok for o in first.values())
    store = open_store(cfg.store)
    q4 = first["quantize:gguf_q4_k_m"]
    files = store.files(ArtifactRef(q4.key, q4.digest, ""))
    (gguf,) = files.glob("*.gguf")
    good = hashlib.sha256(gguf.read_bytes()).hexdigest()
    with open(gguf, "r+b") as f:  # flip one byte in the middle of the tensor data
        f.seek(gguf.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()

    again = {o.spec_id: o for o in run_config(cfg)}
    warned = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "quantize:gguf_q4_k_m" in warned[0] and gguf.name in warned[0], warned
    assert again["quantize:gguf_q4_k_m"].status == RAN and again["quantize:gguf_q4_k_m"].digest == q4.digest
    assert {o.status for sid, o in again.items() if sid != "quantize:gguf_q4_k_m"} == {CACHED}
    assert store.verify(q4.key) == []
    (moved,) = (tmp_path / "store" / C.DAMAGED_DIR).iterdir()
    assert moved.name.startswith(q4.key)
    registry = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR)
    entry = registry.get("tiny-llama-gguf_q4_k_m")
    published = store.verified_files(ArtifactRef(entry["artifact"]["key"], entry["artifact"]["digest"], ""))
    assert hashlib.sha256((published / gguf.name).read_bytes()).hexdigest() == good
    assert len(registry.versions("tiny-llama-gguf_q4_k_m")) == 1


def test_two_identical_runs_started_together_compute_each_step_once(tmp_path):
    """Same command, same project, at the same moment: one computes each step, the other waits for it and reuses
    it; both end well, with the same digests, and no traceback."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import CONF, overrides_for

    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "quantmill.cli", "run", "--json", *overrides_for(tmp_path)]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    done = [(proc.communicate(timeout=600), proc.returncode) for proc in runs]
    reports = []
    for (out, err), code in done:
        assert code == 0 and "Traceback" not in err, err[-3000:]
        reports.append({s["spec_id"]: s for s in json.loads(out)["steps"]})
    assert reports[0].keys() == reports[1].keys()
    for spec_id in reports[0]:
        statuses = sorted(r[spec_id]["status"] for r in reports)
        assert statuses == ["cached", "ran"], (spec_id, statuses)  # computed once, reused once
        assert reports[0][spec_id]["digest"] == reports[1][spec_id]["digest"], spec_id
