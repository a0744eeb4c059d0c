"""Kill a run at points read from its step log, then check what a user would find and resume.

A *kill point* is a step's progress line on stderr ("… quantize gguf_q8_0") and a signal. For each point in turn a
run of the same command is started, the signal is sent once that line appears, and after the run has ended:

- every process of the run is gone (tool children, evaluation processes, Prefect's temporary server);
- the store holds no object without its provenance record, and every object's files match their record
  (``quantmill store check --full``); every registry version is whole and names an object that is in the store;
- what had finished before the kill is still a cache hit (the hits only grow).

A last run goes to the end and must answer every step that had finished from the store. Shared by the bounded
crash test in CI and the longer ``bench/crashes.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantmill.toolchain.interrupts import alive, descendants
from tests.conftest import CONF, QUICK, overrides_for

RECIPES = "recipe=[gguf_q8_0,gguf_q4_k_m,safetensors_f16]"


@dataclass(frozen=True)
class KillPoint:
    line: str  # the progress line's text after "… "
    sig: signal.Signals


@dataclass
class Outcome:
    point: KillPoint
    ended_s: float  # from the signal to the run's exit
    returncode: int
    left_behind: list[int]
    hits: set[str]
    lost: set[str]  # hits before the kill that are no longer hits after it
    problems: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    return {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "quantmill.cli", *args], cwd=root, env=_env(), capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"quantmill {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def overrides(root: Path) -> list[str]:
    return overrides_for(root, RECIPES, *QUICK)


def hits(root: Path) -> set[str]:
    """The keys of the steps the plan answers from the store."""
    steps = json.loads(_cli(root, "plan", "--json", *overrides(root)).stdout)["steps"]
    return {s["key"] for s in steps if s["cache"] == "hit"}


def visible_problems(root: Path) -> list[str]:
    """What a user could find broken: objects without a record or not matching it, registry versions that are
    not whole or name a missing object. Staging folders are not visible (they are removed by the next run)."""
    store = root / "store"
    if not (store / "objects").is_dir():
        return []
    report = json.loads(_cli(root, "store", "check", "--full", "--json", f"store.root={store}", check=False).stdout)
    problems = [f"object without a record: {k}" for k in report["without_record"]]
    problems += [f"damaged object {k}: {v}" for k, v in report["damaged"].items()]
    for version in sorted((store / "registry").glob("*/v*")):
        entry_file = version / "entry.json"
        if not entry_file.is_file() or not (version / "provenance.json").is_file():
            problems.append(f"registry version {version.relative_to(store)} is not whole")
            continue
        key = json.loads(entry_file.read_text())["artifact"]["key"]
        if not (store / "objects" / key / "provenance.json").is_file():
            problems.append(f"registry version {version.relative_to(store)} names a missing object {key[:12]}")
    return problems


def kill_at(root: Path, point: KillPoint, before: set[str], *, start_within: float = 300) -> Outcome:
    err = root / "stderr.txt"
    with open(err, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "run", *overrides(root)], cwd=root,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    try:
        deadline = time.monotonic() + start_within
        while f"… {point.line}" not in err.read_text():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before {point.line!r} started:\n"
                                     f"{err.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{point.line!r} did not start within {start_within} s")
            time.sleep(0.05)
        tree = descendants(proc.pid)
        if point.sig == signal.SIGINT:
            os.killpg(proc.pid, point.sig)  # Ctrl-C: the terminal signals the foreground group
        else:
            os.kill(proc.pid, point.sig)  # kill -9 / SIGTERM reach the main process only
        sent = time.monotonic()
        proc.wait(60)
        ended = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10  # a parent-death signal is delivered at once; give the kernel a moment
    while (left := [pid for pid in tree if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    now = hits(root)
    text = err.read_text()
    problems = visible_problems(root)
    if point.sig != signal.SIGKILL and "Traceback" in text:
        problems.append("a traceback on stderr")
    return Outcome(point, round(ended, 2), proc.returncode, left, now, before - now, problems)


def resume(root: Path) -> tuple[dict, set[str]]:
    """The run that goes to the end: its JSON summary and the keys it answered from the store."""
    before = hits(root)
    proc = _cli(root, "run", "--json", *overrides(root))
    out = json.loads(proc.stdout)
    cached = {s["key"] for s in out["steps"] if s["status"] == "cached"}
    assert cached == before, f"cached {len(cached)} steps, {len(before)} had finished"
    return out, before
