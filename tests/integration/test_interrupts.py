"""Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM end a run promptly: exit 130 / 143,
one line, no process of the run left behind; what finished is kept and the next run resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmill.toolchain.interrupts import alive, descendants
from tests.conftest import CONF, overrides_for
from tests.harness import wait

END_SECONDS = 10


def _start(root: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"}
    err = root / "stderr.txt"
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "run", *overrides_for(root)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    return proc, err


@pytest.mark.parametrize("step, sig, code", [
    ("convert tiny-llama", signal.SIGINT, 130),
    ("imatrix", signal.SIGINT, 130),
    ("validate gguf_q8_0", signal.SIGINT, 130),
    ("convert tiny-llama", signal.SIGTERM, 143),
])
def test_an_interrupted_run_ends_at_once_and_leaves_no_process(tmp_path, step, sig, code):
    proc, err = _start(tmp_path)
    try:
        # the step's progress line is printed once its tool or evaluation process has started
        wait(lambda: f"… {step}" in err.read_text() or proc.poll() is not None, 300, f"step {step!r} to start")
        assert proc.poll() is None, err.read_text()[-3000:]
        tree = descendants(proc.pid)
        assert tree, "the run has started its tool and Prefect's server"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            os.kill(proc.pid, sig)
        sent = time.monotonic()
        proc.wait(END_SECONDS + 5)
        assert time.monotonic() - sent < END_SECONDS
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = err.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("… ")]
    assert proc.returncode == code, text[-3000:]
    assert lines == [f"quantmill: interrupted by {sig.name} during the run of model tiny-llama; finished steps are "
                     f"kept in the store, run the same command again to resume"], lines
    assert "Traceback" not in text
    wait(lambda: not [pid for pid in tree if alive(pid)], 5, "the run's processes to be gone")
    # nothing half-written is visible, and the next run resumes: what finished before is answered from the store
    objects = tmp_path / "store" / "objects"
    finished = {p.name for p in objects.iterdir()} if objects.exists() else set()
    for key in finished:
        assert (objects / key / "provenance.json").is_file(), key
    again = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", "--json", *overrides_for(tmp_path)],
                           cwd=tmp_path, env={**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    import json

    steps = json.loads(again.stdout)["steps"]
    assert {s["key"] for s in steps if s["status"] == "cached"} == finished


@pytest.mark.parametrize("step", ["convert tiny-llama", "validate gguf_q8_0"])
def test_a_run_killed_with_sigkill_leaves_no_process_and_nothing_half_written(tmp_path, step):
    proc, err = _start(tmp_path)
    try:
        wait(lambda: f"… {step}" in err.read_text() or proc.poll() is not None, 300, f"step {step!r} to start")
        assert proc.poll() is None, err.read_text()[-3000:]
        tree = descendants(proc.pid)
        assert tree
        os.kill(proc.pid, signal.SIGKILL)  # the machine's OOM killer, or kill -9: no handler runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # every child quantmill started dies with it (a parent-death signal), the temporary API server included
    wait(lambda: not [pid for pid in tree if alive(pid)], 10, "the killed run's processes to be gone")
    objects = tmp_path / "store" / "objects"
    for key in (p.name for p in objects.iterdir()) if objects.exists() else []:
        assert (objects / key / "provenance.json").is_file(), key


def test_the_kept_server_serves_the_next_run_and_stops_once_unused(tmp_path):
    """infra.server=kept: the first run starts the project's server, the next run uses the same one (both runs are
    recorded there), a client killed with -9 does not take it down, and it stops by itself once no run uses it."""
    import json

    import httpx

    home = tmp_path / "prefect"
    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1", "QUANTMILL_PREFECT_SERVER": "kept"}
    quick = ["validate.enabled=false", "publish.enabled=false", "infra.server_idle_seconds=3"]

    def run(recipe: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", "--json", *overrides_for(tmp_path),
                               f"recipe=[{recipe}]", *quick], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((home / "kept-server.json").read_text())

    # The test counts as one of the server's clients while it looks at it, as a run does: on a loaded machine the
    # seconds between two runs could otherwise exceed the short idle time set here.
    me = home / "kept-server.clients" / str(os.getpid())
    home.joinpath("kept-server.clients").mkdir(parents=True, exist_ok=True)
    me.touch()
    first = run("gguf_q8_0")
    assert alive(first["pid"]) and first["pid"] not in descendants(os.getpid())  # nobody's child
    second = run("gguf_q4_0")
    assert second == first
    runs = httpx.post(f"{first['url']}/flow_runs/filter", json={}).json()
    assert len([r for r in runs if r["state_type"] == "COMPLETED"]) == 2, [r["state_type"] for r in runs]
    # A client killed with -9 (no exit handler runs): the server stays, and counts it as gone. A process registered
    # as a client stands for the run: a real run of the bundled model may end before a kill could land.
    killed = subprocess.Popen(["sleep", "600"])
    (home / "kept-server.clients" / str(killed.pid)).touch()
    killed.kill()
    killed.wait()
    wait(lambda: not (home / "kept-server.clients" / str(killed.pid)).exists(), 60, "the killed client to count as gone")
    assert alive(first["pid"])
    me.unlink()
    wait(lambda: not alive(first["pid"]), 60, "the kept server to stop once no run uses it")
    assert not (home / "kept-server.json").exists()
    assert not any((home / "kept-server.clients").iterdir())
