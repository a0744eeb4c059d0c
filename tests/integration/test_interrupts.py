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
