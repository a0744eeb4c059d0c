"""Ctrl-C and SIGTERM end a run promptly: one line, every child process stopped, exit 130 / 143.

Inside ``guard()`` the first SIGINT or SIGTERM does not unwind the run (an orchestrator reporting a crash to a
server that the same Ctrl-C has just stopped can wait a minute on its retries): it stops this process's
children and descendants — external tools, quantizer and evaluation processes, a temporary API server — and
exits. Finished steps are already committed to the store; a step that was running leaves only its staging
directory, which nothing reads.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

GRACE_SECONDS = 3.0  # children get SIGTERM, then SIGKILL after this
_STOPPING = threading.Event()


def stopping() -> bool:
    """True once this process is being stopped: a step that sees its tool die now must not commit anything."""
    return _STOPPING.is_set()


def begin_stopping() -> None:
    """From now on this process is being stopped (``stopping()``): for a stop that does not go through
    ``guard()``, such as a worker's."""
    _STOPPING.set()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def stop_descendants(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every descendant of this process, then SIGKILL those still alive after ``grace`` seconds."""
    pids = descendants(os.getpid())
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in descendants(os.getpid()) + pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie that its parent has not reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextmanager
def guard(what: str) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM end the process as described above; ``what`` names the work in the line.
    Outside the main thread (where handlers cannot be installed) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame) -> None:
        _STOPPING.set()  # before any child is stopped: their deaths must not become committed results
        logging.disable(logging.CRITICAL)  # the run's threads see their tools die: nothing of theirs is news
        name = signal.Signals(signum).name
        os.write(2, f"quantmill: interrupted by {name} during {what}; finished steps are kept in the store, run the "
                    f"same command again to resume\n".encode())
        stop_descendants()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
