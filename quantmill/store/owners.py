"""Who owns a staging folder: the process writing it, recorded so that a folder left by a killed step can be told
from one being written."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

OWNER_FILE = "owner.json"  # in each staging folder: the process that writes it (removed at commit)


def mark_owner(staging_root: Path) -> None:
    """Record this process as the staging folder's owner (host, pid and the pid's start time: pids are reused)."""
    (staging_root / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                       "started": _start_time(os.getpid())}))


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owned_by_a_live_process(staging_root: Path) -> bool:
    """True while the process that made the folder runs (on this host); a folder of another host counts as owned."""
    try:
        owner = json.loads((staging_root / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return True  # a shared filesystem: another machine's process, which this one cannot see
    started = _start_time(int(owner["pid"]))
    return started is not None and started == owner.get("started")
