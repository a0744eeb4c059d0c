"""`quantmill trigger`: a real git repository made here, one commit per edit; each test asserts the exact runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantmill.batches import trigger
from tests.conftest import project

BATCH = """\
recipes: [gguf_q8_0, gguf_q4_k_m, mlx_4bit]
models:
  - tiny_llama
  - tiny_b
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A project repository: conf/ (default pipeline tiny-llama x [q8_0, q4_k_m]) and batch `pair`, committed."""
    root = tmp_path / "repo"
    root.mkdir()
    project(root, batch=BATCH)
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "base")
    return root


def commit(repo: Path, edits: dict[str, str | None], message: str = "edit") -> str:
    for path, text in edits.items():
        if text is None:
            (repo / path).unlink()
        else:
            (repo / path).write_text(text)
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def runs(repo: Path, base: str = "HEAD~1", head: str = "HEAD") -> tuple[set[str], set[str], dict[str, str]]:
    _, _, changes = trigger.changes(repo, base, head)
    return ({c.run.id for c in changes if c.action == "run"}, {c.run.id for c in changes if c.action == "removed"},
            {c.run.id: c.why for c in changes})


def edit(repo: Path, path: str, old: str, new: str) -> str:
    text = (repo / path).read_text()
    assert old in text
    return text.replace(old, new)


def test_a_recipe_threshold_triggers_only_the_runs_of_that_recipe(repo):
    commit(repo, {"conf/recipe/gguf_q4_k_m.yaml": edit(repo, "conf/recipe/gguf_q4_k_m.yaml", "max_ppl_ratio: 1.1",
                                                       "max_ppl_ratio: 1.05")})
    run, removed, why = runs(repo)
    assert run == {"pipeline/tiny-llama/gguf_q4_k_m", "pair/tiny-llama/gguf_q4_k_m", "pair/tiny-b/gguf_q4_k_m"}
    assert not removed
    assert why["pair/tiny-b/gguf_q4_k_m"] == "recipe.gates.max_ppl_ratio: 1.1 -> 1.05; " \
                                            "validate.gates.max_ppl_ratio: 1.1 -> 1.05"


def test_b_a_shared_calibration_file_triggers_every_run_that_uses_it(repo):
    commit(repo, {"conf/calibration/default.yaml": edit(repo, "conf/calibration/default.yaml", "num_samples: 64",
                                                        "num_samples: 32")})
    run, _, why = runs(repo)
    # the imatrix recipe reads the calibration set; Q8_0 and MLX 4-bit do not
    assert run == {"pipeline/tiny-llama/gguf_q4_k_m", "pair/tiny-llama/gguf_q4_k_m", "pair/tiny-b/gguf_q4_k_m"}
    assert why["pipeline/tiny-llama/gguf_q4_k_m"] == "calibration.num_samples: 64 -> 32"
    commit(repo, {"conf/convert/default.yaml": edit(repo, "conf/convert/default.yaml", "mlx_dtype: float16",
                                                    "mlx_dtype: bfloat16")})
    assert runs(repo)[0] == {"pair/tiny-llama/mlx_4bit", "pair/tiny-b/mlx_4bit"}


def test_c_whitespace_and_comments_trigger_nothing(repo):
    recipe = "conf/recipe/gguf_q4_k_m.yaml"
    text = (repo / recipe).read_text()
    commit(repo, {recipe: "# reviewed\n" + text.replace("  method: gguf", "  method:   gguf   # llama.cpp") + "\n\n",
                  "conf/calibration/default.yaml": (repo / "conf/calibration/default.yaml").read_text() + "# note\n",
                  "conf/batch/pair.yaml": BATCH.replace("models:", "models:   # the catalogue")})
    assert runs(repo) == (set(), set(), {})


def test_d_adding_a_model_to_a_batch_triggers_that_models_runs_only(repo, tmp_path):
    from tests.conftest import second_model

    other = second_model(tmp_path / "tiny-c", scale=0.99)
    commit(repo, {"conf/model/tiny_c.yaml": f"name: tiny-c\nsource: local\npath: {other}\n",
                  "conf/batch/pair.yaml": BATCH + "  - tiny_c\n"})
    run, removed, why = runs(repo)
    assert run == {"pair/tiny-c/gguf_q8_0", "pair/tiny-c/gguf_q4_k_m", "pair/tiny-c/mlx_4bit"} and not removed
    assert set(why.values()) == {"new"}


def test_e_deleting_a_recipe_triggers_nothing_and_reports_it(repo):
    commit(repo, {"conf/recipe/mlx_4bit.yaml": None,
                  "conf/batch/pair.yaml": BATCH.replace(", mlx_4bit]", "]")})
    run, removed, why = runs(repo)
    assert run == set()
    assert removed == {"pair/tiny-llama/mlx_4bit", "pair/tiny-b/mlx_4bit"}
    assert why["pair/tiny-b/mlx_4bit"] == "not in conf/ at head; nothing runs"


def _cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantmill.cli", "trigger", *args], cwd=repo, capture_output=True,
                          text=True, timeout=300)


def test_cli_prints_the_plan_and_a_dry_run_runs_nothing(repo):
    commit(repo, {"conf/recipe/gguf_q8_0.yaml": edit(repo, "conf/recipe/gguf_q8_0.yaml", "quant_type: Q8_0",
                                                     "quant_type: Q8_0\n  description: edited")})
    proc = _cli(repo, "--base", "HEAD~1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(": 3 runs to go, 0 removed")
    assert sorted(lines[1:]) == [f"  run     {r}/gguf_q8_0: recipe.description: '' -> 'edited'"
                                 for r in ("pair/tiny-b", "pair/tiny-llama", "pipeline/tiny-llama")]
    data = json.loads(_cli(repo, "--base", "HEAD~1", "--dry-run", "--json").stdout)
    assert data["head"] == git(repo, "rev-parse", "HEAD") and data["results"] == []
    assert not (repo / "store").exists()  # nothing ran, nothing was written


@pytest.mark.slow
def test_cli_runs_exactly_the_triggered_runs(repo):
    """Without --dry-run the triggered runs run here, and nothing of an untouched recipe is built."""
    commit(repo, {"conf/recipe/gguf_q8_0.yaml": edit(repo, "conf/recipe/gguf_q8_0.yaml", "quant_type: Q8_0",
                                                     "quant_type: Q8_0\n  description: edited")})
    proc = _cli(repo, "--base", "HEAD~1", "--json", "validate.n_chunks=2", "validate.n_ctx=128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    expected = ["pipeline/tiny-llama/gguf_q8_0", "pair/tiny-llama/gguf_q8_0", "pair/tiny-b/gguf_q8_0"]
    assert [c["id"] for c in data["changes"]] == expected
    assert [(r["id"], r["ok"]) for r in data["results"]] == [(i, True) for i in expected]
    assert data["results"][0]["ran"] > 0 and data["results"][1]["ran"] == 0  # one model, one recipe: built once
    published = sorted(p.name for p in (repo / "store" / "registry").iterdir() if p.is_dir())
    assert published == ["tiny-b-gguf_q8_0", "tiny-llama-gguf_q8_0"]


def test_unknown_revision_is_one_line(repo):
    proc = _cli(repo, "--base", "no-such-branch", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"quantmill: error: revision 'no-such-branch' does not exist in {repo}; give a " \
                                  f"commit, branch or tag (`git log --oneline` lists them)"


def test_head_that_does_not_compose_submits_nothing_and_shows_hydra(repo):
    commit(repo, {"conf/recipe/gguf_q8_0.yaml": edit(repo, "conf/recipe/gguf_q8_0.yaml", "quant_type: Q8_0",
                                                     "quant_typ: Q8_0")})
    proc = _cli(repo, "--base", "HEAD~1")
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith(f"quantmill: error: conf/ does not compose at head {git(repo, 'rev-parse', 'HEAD')[:12]} "
                          f"(conf/recipe/gguf_q8_0.yaml): conf/config.yaml: unknown config key 'quant_typ'"), err
    assert "(Hydra: In 'recipe/gguf_q8_0': ConfigKeyError raised while composing config: Key 'quant_typ' not in " \
           "'RecipeConfig'" in err
    assert err.endswith("; nothing was submitted") and len(err.splitlines()) == 1
    assert not (repo / "store").exists()
    commit(repo, {"conf/recipe/gguf_q8_0.yaml": edit(repo, "conf/recipe/gguf_q8_0.yaml", "quant_typ:", "quant_type:"),
                  "conf/batch/pair.yaml": BATCH.replace("tiny_b", "tiny_bb")})
    err = _cli(repo, "--base", "HEAD~2", "--dry-run").stderr
    assert "conf/batch/pair.yaml:4: unknown model 'tiny_bb'; did you mean 'tiny_b'?" in err


def test_the_git_hook_prints_the_plan_of_each_commit_touching_conf(repo):
    import os

    from tests.conftest import REPO

    git(repo, "config", "core.hooksPath", str(REPO / "examples" / "hooks"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"

    def commit_with_hook(path: str, text: str) -> str:
        (repo / path).write_text(text)
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        proc = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                               "-m", path], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    out = commit_with_hook("conf/recipe/mlx_4bit.yaml", edit(repo, "conf/recipe/mlx_4bit.yaml", "group_size: 64",
                                                             "group_size: 32"))
    assert "2 runs to go, 0 removed" in out
    assert "run     pair/tiny-b/mlx_4bit: recipe.params.group_size: 64 -> 32" in out
    assert commit_with_hook("NOTES.md", "not conf\n") == ""


def test_the_example_ci_workflow_plans_pull_requests_and_submits_merges():
    import yaml

    from tests.conftest import REPO

    steps = yaml.safe_load((REPO / "examples" / "ci" / "github-actions.yml").read_text())["jobs"]["trigger"]["steps"]
    runs = [s["run"] for s in steps if "run" in s and "quantmill trigger" in s["run"]]
    assert [r.split("--head HEAD ")[1] for r in runs] == ["--dry-run", "--submit"]
