"""`quantmill watch`: a local directory as upstream; a changed directory triggers its model's run, nothing else."""

from __future__ import annotations

import json

import pytest

from quantmill.batches.watch import check, watch_once
from quantmill.prefect.launch import run_here
from tests.conftest import QUICK, project, second_model

pytestmark = pytest.mark.slow


def test_watch_runs_only_where_upstream_changed(tmp_path):
    conf = project(tmp_path, batch=f"recipes: [gguf_q8_0]\noverrides: [{', '.join(QUICK)}]\n"
                                   f"models: [tiny_llama, tiny_b]\n")
    first = watch_once(conf, "pair", run_here)
    assert [(m["model"], m["previous"], m["runs"]) for m in first["models"]] == [
        ("pair/tiny-llama", None, ["pair/tiny-llama/gguf_q8_0"]), ("pair/tiny-b", None, ["pair/tiny-b/gguf_q8_0"])]
    assert all(r["ok"] and r["ran"] > 0 for m in first["models"] for r in m["results"])

    unchanged = watch_once(conf, "pair", run_here)
    assert unchanged["triggered"] == 0 and [m["changed"] for m in unchanged["models"]] == [False, False]
    print(f"unchanged pass: {unchanged['seconds']} s")

    # new weights upstream (the same directory, other bytes): that model's run only, built anew
    model = tmp_path / "models" / "tiny-b"
    before = (model / "model.safetensors").read_bytes()
    replacement = second_model(tmp_path / "replacement", scale=1.02)
    (model / "model.safetensors").write_bytes((replacement / "model.safetensors").read_bytes())
    assert (model / "model.safetensors").read_bytes() != before
    changed = watch_once(conf, "pair", run_here)
    assert changed["triggered"] == 1
    (llama, tiny_b) = changed["models"]
    assert not llama["changed"] and tiny_b["changed"] and tiny_b["previous"] == unchanged["models"][1]["revision"]
    assert [(r["id"], r["ok"]) for r in tiny_b["results"]] == [("pair/tiny-b/gguf_q8_0", True)]
    assert tiny_b["results"][0]["ran"] >= 4  # download, convert, quantize, validate (and publish) built again

    state = json.loads(next((tmp_path / "store").rglob("watch/pair.json")).read_text())
    assert state["pair/tiny-b"]["revision"] == tiny_b["revision"] != tiny_b["previous"]
    assert [u.changed for u in check(conf, "pair")[0]] == [False, False]


def test_watch_an_s3_folder_by_its_objects_etags(tmp_path, s3_endpoint, monkeypatch):
    """The upstream is a model folder in a bucket (moto's S3 server): replacing an object is one run, no more."""
    import boto3

    from quantmill.backends.local_source import BUNDLED_ROOT

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    client = boto3.client("s3")
    client.create_bucket(Bucket="upstream-models")
    for p in (BUNDLED_ROOT / "tiny-llama").iterdir():
        client.upload_file(str(p), "upstream-models", f"tiny/{p.name}")
    conf = project(tmp_path, batch=f"recipes: [gguf_q8_0]\noverrides: [{', '.join(QUICK)}]\nmodels:\n"
                                   f"  - model: s3\n    overrides: [model.path=s3://upstream-models/tiny, "
                                   f"model.name=tiny-s3]\n")
    first = watch_once(conf, "pair", run_here)
    assert first["triggered"] == 1 and first["models"][0]["results"][0]["ok"]
    assert watch_once(conf, "pair", run_here)["triggered"] == 0
    replacement = second_model(tmp_path / "replacement", scale=0.98)
    client.upload_file(str(replacement / "model.safetensors"), "upstream-models", "tiny/model.safetensors")
    changed = watch_once(conf, "pair", run_here)
    assert changed["triggered"] == 1 and changed["models"][0]["results"][0]["ok"]
    assert changed["models"][0]["results"][0]["ran"] >= 4
    # what was built is the replaced object: the download's record names the ETags it fetched
    from quantmill.store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    downloads = [store.statement(k) for k in store.keys()
                 if store.statement(k)["predicate"]["buildDefinition"]["externalParameters"]["step"] == "download"]
    etags = {d["predicate"]["buildDefinition"]["resolvedDependencies"][0]["annotations"]["etags"]["model.safetensors"]
             for d in downloads}
    head = client.head_object(Bucket="upstream-models", Key="tiny/model.safetensors")["ETag"].strip('"')
    assert len(etags) == 2 and head in etags
