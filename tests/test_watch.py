"""`quantmill watch`: a local directory as upstream; a changed directory triggers its model's run, nothing else."""

from __future__ import annotations

import json

import pytest

from quantmill.watch import check, watch_once
from tests.conftest import QUICK, project, second_model

pytestmark = pytest.mark.slow


def test_watch_runs_only_where_upstream_changed(tmp_path):
    conf = project(tmp_path, batch=f"recipes: [gguf_q8_0]\noverrides: [{', '.join(QUICK)}]\n"
                                   f"models: [tiny_llama, tiny_b]\n")
    first = watch_once(conf, "pair")
    assert [(m["model"], m["previous"], m["runs"]) for m in first["models"]] == [
        ("pair/tiny-llama", None, ["pair/tiny-llama/gguf_q8_0"]), ("pair/tiny-b", None, ["pair/tiny-b/gguf_q8_0"])]
    assert all(r["ok"] and r["ran"] > 0 for m in first["models"] for r in m["results"])

    unchanged = watch_once(conf, "pair")
    assert unchanged["triggered"] == 0 and [m["changed"] for m in unchanged["models"]] == [False, False]
    print(f"unchanged pass: {unchanged['seconds']} s")

    # new weights upstream (the same directory, other bytes): that model's run only, built anew
    model = tmp_path / "models" / "tiny-b"
    before = (model / "model.safetensors").read_bytes()
    replacement = second_model(tmp_path / "replacement", scale=1.02)
    (model / "model.safetensors").write_bytes((replacement / "model.safetensors").read_bytes())
    assert (model / "model.safetensors").read_bytes() != before
    changed = watch_once(conf, "pair")
    assert changed["triggered"] == 1
    (llama, tiny_b) = changed["models"]
    assert not llama["changed"] and tiny_b["changed"] and tiny_b["previous"] == unchanged["models"][1]["revision"]
    assert [(r["id"], r["ok"]) for r in tiny_b["results"]] == [("pair/tiny-b/gguf_q8_0", True)]
    assert tiny_b["results"][0]["ran"] >= 4  # download, convert, quantize, validate (and publish) built again

    state = json.loads(next((tmp_path / "store").rglob("watch/pair.json")).read_text())
    assert state["pair/tiny-b"]["revision"] == tiny_b["revision"] != tiny_b["previous"]
    assert [u.changed for u in check(conf, "pair")[0]] == [False, False]
