"""Batch files: expansion into runs, errors naming FILE:LINE, and a 2 models x 3 recipes batch run twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantmill.batches.batch import BatchError, batch_runs, changed_paths, load_batch
from quantmill.errors import ConfigError
from tests.conftest import QUICK, project

PAIR = """\
# two models, three recipes
recipes: [gguf_q8_0, gguf_q4_k_m, safetensors_f16]
overrides: [{quick}]
models:
  - tiny_llama
  - model: tiny_b
    overrides: [validate.max_tokens=8]
"""


def _pair(root: Path, text: str = PAIR) -> Path:
    return project(root, batch=text.format(quick=", ".join(QUICK)))


def test_batch_expands_to_one_run_per_model_and_recipe(tmp_path):
    conf = _pair(tmp_path)
    runs = batch_runs(conf, load_batch(conf, "pair"))
    assert [r.id for r in runs] == [f"pair/{m}/{r}" for m in ("tiny-llama", "tiny-b")
                                    for r in ("gguf_q8_0", "gguf_q4_k_m", "safetensors_f16")]
    assert runs[0].where == "conf/batch/pair.yaml:5" and runs[3].where == "conf/batch/pair.yaml:6"
    b = runs[3]
    assert b.compose_overrides() == [*QUICK, "model=tiny_b", "validate.max_tokens=8", "recipe=[gguf_q8_0]"]
    assert b.fingerprint["validate"]["max_tokens"] == 8 and runs[0].fingerprint["validate"]["max_tokens"] == 16
    # only the imatrix recipe depends on the calibration set; the conversion settings only for GGUF
    assert [("calibration" in r.fingerprint, "convert" in r.fingerprint) for r in runs[:3]] == \
        [(False, True), (True, True), (False, False)]


def test_changed_paths_names_each_difference():
    assert changed_paths({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"b": 2, "c": [1]}, "e": 2}) == \
        ["a.b: 1 -> 2", "d: removed", "e: added 2"]


@pytest.mark.parametrize("text, message", [
    ("models:\n  - tiny_llama\n  - tiny_lama\n",
     "conf/batch/pair.yaml:3: unknown model 'tiny_lama'; did you mean 'tiny_llama'? known: hf, local, s3, tiny_b, "
     "tiny_llama"),
    ("recipes: [gguf_q8_0]\nmodels:\n  - model: tiny_llama\n    recipes:\n      - gguf_q4_k_m\n      - gguf_q9\n",
     "conf/batch/pair.yaml:6: unknown recipe 'gguf_q9'"),
    ("recipes: [gguf_q8_0, nope]\nmodels: [tiny_llama]\n", "conf/batch/pair.yaml:1: unknown recipe 'nope'"),
    ("models:\n  - model: tiny_llama\n    recipe: [gguf_q8_0]\n",
     "conf/batch/pair.yaml:3: unknown key 'recipe' in a models entry; known: model, overrides, recipes, targets"),
    ("models: [tiny_llama]\nwatch: {cron: daily}\n", "conf/batch/pair.yaml:2: watch.cron 'daily' is not a 5-field"),
    ("models: [tiny_llama]\noverrides: [validate.n_chunk=2]\n",
     "conf/batch/pair.yaml:1: unknown config key 'validate.n_chunk'"),
    ("models: [tiny_llama\n", "conf/batch/pair.yaml:2: not valid YAML"),
    ("recipes: [gguf_q8_0]\n", "conf/batch/pair.yaml:1: batch has no `models:` list"),
])
def test_bad_batch_names_the_file_and_line(tmp_path, text, message):
    conf = project(tmp_path, batch=text)
    with pytest.raises(BatchError) as e:
        batch_runs(conf, load_batch(conf, "pair"))
    assert str(e.value).startswith(message), str(e.value)


def test_unknown_batch_lists_the_known_ones(tmp_path):
    conf = _pair(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown batch 'pairs'; known: pair \(files in .*conf/batch\)"):
        load_batch(conf, "pairs")


@pytest.mark.slow
def test_batch_runs_once_then_is_all_cached(tmp_path):
    """`quantmill batch pair`: six runs pass; the second time no step runs (every step answered from the store)."""
    conf = _pair(tmp_path)
    cmd = [sys.executable, "-m", "quantmill.cli", "batch", "pair", "--json", "--config-dir", str(conf)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads(first.stdout)["results"]
    assert [r["id"] for r in results] == [r.id for r in batch_runs(conf, load_batch(conf, "pair"))]
    assert all(r["ok"] and r["ran"] > 0 for r in results[:1] + results[3:4])  # each model's first run built it
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert [(r["ok"], r["ran"]) for r in again["results"]] == [(True, 0)] * 6
    assert all(r["cached"] > 0 for r in again["results"])
    registry = sorted(p.name for p in (tmp_path / "store" / "registry").iterdir() if p.is_dir())
    assert registry == sorted(f"{m}-{r}" for m in ("tiny-llama", "tiny-b")
                              for r in ("gguf_q8_0", "gguf_q4_k_m", "safetensors_f16"))
