"""The Hugging Face source, through huggingface_hub's own code, offline from a populated HF cache.

No Hub can be reached from here, so the cache is laid out by the test exactly as huggingface_hub writes it
(refs/<revision> -> commit sha, snapshots/<sha>/<files>); everything after that is the library's real path.
"""

from __future__ import annotations

import json
import shutil

import pytest

from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.errors import ModelSourceError, PreflightError
from quantmill.plan.build import plan
from quantmill.store import open_store
from tests.conftest import compose_in, run_inline

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(BUNDLED_ROOT / "tiny-llama", repo / "snapshots" / SHA)
    (repo / "snapshots" / SHA / "pytorch_model.bin").write_bytes(b"pickle that must never be fetched")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / SHA


def _cfg(tmp_path, *extra):
    return compose_in(tmp_path, "model=hf", "model.repo_id=acme/tiny-llama", "model.name=acme-tiny",
                      "recipe=[gguf_q8_0]", "validate.enabled=false", "publish.enabled=false", *extra)


def test_revision_resolves_to_commit_sha_and_keys_on_it(tmp_path, hf_cache):
    cfg = _cfg(tmp_path)
    the_plan = plan(cfg, open_store(cfg.store))
    assert the_plan.source.identity == {"repo_id": "acme/tiny-llama", "commit": SHA}
    assert the_plan.source.uri == f"hf://acme/tiny-llama@{SHA}"
    files = the_plan.specs["download"].config["files"]
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert "pytorch_model.bin" not in files  # pickle is never taken when safetensors exist


def test_download_and_convert_from_the_hf_cache(tmp_path, hf_cache):
    store, _, results = run_inline(_cfg(tmp_path))
    downloaded = store.files(results["download"].ref)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (downloaded / name).read_bytes() == (hf_cache / name).read_bytes()
    stmt = store.statement(results["download"].ref.key)
    model_dep = [d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"] if d["name"] == "model"]
    assert model_dep == [{"name": "model", "uri": f"hf://acme/tiny-llama@{SHA}", "digest": {"gitCommit": SHA}}]
    assert (store.files(results["quantize:gguf_q8_0"].ref) / "model-q8_0.gguf").stat().st_size > 0


def test_unknown_revision_offline(tmp_path, hf_cache):
    with pytest.raises(ModelSourceError, match=r"acme/tiny-llama'@v9 is not in the local HF cache"):
        cfg = _cfg(tmp_path, "model.revision=v9")
        plan(cfg, open_store(cfg.store))


def test_unsupported_architecture_is_refused_before_weights_are_fetched(tmp_path, hf_cache):
    config = json.loads((hf_cache / "config.json").read_text())
    config["architectures"] = ["WhisperForConditionalGeneration"]
    (hf_cache / "config.json").write_text(json.dumps(config))
    cfg = _cfg(tmp_path)
    with pytest.raises(PreflightError, match="which llama.cpp's converter"):
        plan(cfg, open_store(cfg.store))
    assert not any((tmp_path / "store" / "objects").iterdir())
