"""Runs submitted to a real Prefect server (`quantmill server` here) and run by a real worker of the pipeline pool:
the Hydra launcher's sweep, `trigger --submit`, and the scheduled watch deployment. Read back from the API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICK, project
from tests.harness import cli, killpg, start_server, wait

pytestmark = pytest.mark.slow

BATCH = "recipes: [gguf_q8_0]\nmodels: [tiny_llama, tiny_b]\nwatch:\n  cron: \"30 2 * * 1-5\"\n  timezone: Europe/Paris\n"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server, a project (conf/ in a git repository) and one worker of pool cpu (the pipeline pool)."""
    root = tmp_path_factory.mktemp("submit")
    proc, url, env = start_server(root)
    repo = root / "repo"
    repo.mkdir()
    conf = project(repo, batch=BATCH)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    env = {**env, "QUANTMILL_CONF": str(conf)}
    home = root / "worker"
    home.mkdir()
    worker = subprocess.Popen(cli("worker", "--pool", "cpu", "--name", "w-cpu", "--cache-dir", str(home / "cache"),
                                  "--poll-seconds", "0.5", "--limit", "2"), cwd=home,
                              env={**env, "PREFECT_HOME": str(home / "prefect")}, stdout=open(home / "log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    ctx = {"url": url, "env": env, "repo": repo, "conf": conf, "root": root}
    wait(lambda: _deployments(ctx) >= {"quantmill-pipeline/cpu", "quantmill-step/cpu"} or worker.poll() is not None,
         90, f"worker (log: {home / 'log'})")
    assert worker.poll() is None, (home / "log").read_text()
    yield ctx
    killpg(worker)
    killpg(proc)


def _client(ctx):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True, httpx_settings={"base_url": ctx["url"]})


def _deployments(ctx) -> set[str]:
    try:
        with _client(ctx) as client:
            flows = {f.id: f.name for f in client.read_flows()}
            return {f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}
    except Exception:  # noqa: BLE001 - the server is starting
        return set()


def _runs_tagged(ctx, tag: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with _client(ctx) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def _quantmill(ctx, *args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=cwd or ctx["repo"], env=ctx["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_prefect_launcher_submits_a_2x2_sweep_as_four_flow_runs(server):
    proc = _quantmill(server, "run", "-m", "--json", "hydra/launcher=prefect", "hydra.launcher.wait=true",
                      "model=tiny_llama,tiny_b", "recipe=[gguf_q8_0],[safetensors_f16]", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    submitted = json.loads(proc.stdout)["submitted"]
    assert sorted(s["name"] for s in submitted) == sorted(f"sweep/{m}/{r}#{i}" for i, (m, r) in enumerate(
        (m, r) for m in ("tiny-llama", "tiny-b") for r in ("gguf_q8_0", "safetensors_f16")))
    runs = {str(r.id): r for r in _runs_tagged(server, "origin:sweep")}
    assert set(runs) == {s["flow_run_id"] for s in submitted}
    for s in submitted:
        run = runs[s["flow_run_id"]]
        assert run.name == s["name"] and run.state.type.value == "COMPLETED" and run.work_pool_name == "cpu"
        config = run.parameters["config"]
        _, model, recipe = s["name"].split("#")[0].split("/")
        assert config["model"]["name"] == model and list(config["recipe"]) == [recipe]
        assert config["store"]["root"] == str(server["repo"] / "store")  # absolute: the worker runs elsewhere
    registry = sorted(p.name for p in (server["repo"] / "store" / "registry").iterdir() if p.is_dir())
    assert registry == ["tiny-b-gguf_q8_0", "tiny-b-safetensors_f16", "tiny-llama-gguf_q8_0",
                        "tiny-llama-safetensors_f16"]


def test_trigger_submits_exactly_the_changed_runs(server):
    repo = server["repo"]
    recipe = repo / "conf" / "recipe" / "gguf_q8_0.yaml"
    recipe.write_text(recipe.read_text().replace("quant_type: Q8_0", "quant_type: Q8_0\n  description: edited"))
    git(repo, "commit", "-q", "-am", "q8_0: describe")
    head = git(repo, "rev-parse", "HEAD")
    proc = _quantmill(server, "trigger", "--base", "HEAD~1", "--submit", "--json", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"pipeline/tiny-llama/gguf_q8_0", "pair/tiny-llama/gguf_q8_0", "pair/tiny-b/gguf_q8_0"}
    assert {r["id"] for r in json.loads(proc.stdout)["results"]} == expected
    runs = _runs_tagged(server, f"trigger:{head[:12]}")
    assert {r.name for r in runs} == expected
    assert {t for r in runs for t in r.tags if t.startswith("origin:")} == {"origin:pipeline", "origin:pair"}
    final = wait(lambda: [r for r in _runs_tagged(server, f"trigger:{head[:12]}") if r.state.is_final()]
                 if all(r.state.is_final() for r in _runs_tagged(server, f"trigger:{head[:12]}")) else None,
                 600, "the triggered runs to finish")
    assert sorted((r.name, r.state.type.value) for r in final) == sorted((i, "COMPLETED") for i in expected)


def test_deploy_schedules_a_watch_per_batch_with_its_cron(server):
    proc = _quantmill(server, "deploy", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deployed quantmill-watch/pair" in proc.stdout.splitlines()
    prefect = [sys.executable, "-m", "prefect"]  # as CI runs it: the venv's python, its bin/ not on PATH
    listing = subprocess.run([*prefect, "deployment", "ls"], env={**server["env"], "COLUMNS": "200"},
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "quantmill-watch/pair" in listing.stdout, listing.stdout + listing.stderr
    with _client(server) as client:
        deployment = client.read_deployment_by_name("quantmill-watch/pair")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
        [("30 2 * * 1-5", "Europe/Paris", True)]
    assert deployment.parameters == {"batch": "pair"} and deployment.work_pool_name == "cpu"
    # The server's scheduler makes the schedule's runs (it failed on SQLAlchemy 2.1: 'Can't evaluate bulk DML
    # statement'): each at 02:30 in Paris on a weekday, for the worker to take then.
    from zoneinfo import ZoneInfo

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    def scheduled():
        with _client(server) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))

    runs = wait(scheduled, 120, "the server's scheduler to schedule the watch's runs")
    paris = [r.expected_start_time.astimezone(ZoneInfo("Europe/Paris")) for r in runs]
    assert all((t.hour, t.minute) == (2, 30) and t.weekday() < 5 for t in paris), paris
    assert all(r.state.is_scheduled() for r in runs)
    inspect = subprocess.run([*prefect, "deployment", "inspect", "quantmill-watch/pair"], env=server["env"],
                             capture_output=True, text=True, timeout=120)
    assert "'cron': '30 2 * * 1-5'" in inspect.stdout, inspect.stdout + inspect.stderr
    again = _quantmill(server, "deploy", timeout=120)  # idempotent: still one schedule
    assert again.returncode == 0
    with _client(server) as client:
        assert len(client.read_deployment_by_name("quantmill-watch/pair").schedules) == 1


def test_a_run_of_the_watch_deployment_builds_the_batch_on_the_worker(server):
    """What the schedule starts, started now: the worker runs one watch pass in the project and records it."""
    with _client(server) as client:
        deployment = client.read_deployment_by_name("quantmill-watch/pair")
        run = client.create_flow_run_from_deployment(deployment.id, tags=["test-watch"])
    final = wait(lambda: (r := _runs_tagged(server, "test-watch")[0]).state.is_final() and r, 600, "the watch run")
    assert final.state.type.value == "COMPLETED" and str(final.id) == str(run.id), final.state.message
    state = json.loads(next((server["repo"] / "store").rglob("watch/pair.json")).read_text())
    assert sorted(state) == ["pair/tiny-b", "pair/tiny-llama"]
    assert state["pair/tiny-b"]["runs"] == ["pair/tiny-b/gguf_q8_0"]
