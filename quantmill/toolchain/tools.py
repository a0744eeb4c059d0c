"""Running external tools: stream their output into a progress bar, keep the tail for error messages, and
record each child's own peak RSS (``os.wait4``), which the benchmarks compare against the bare tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from quantmill.errors import ToolError
from quantmill.progress import reporter
from quantmill.toolchain import interrupts

_SPLIT = re.compile(rb"[\r\n]+")
# util-linux's setpriv sets a parent-death signal, then execs the tool (same process: its peak RSS is the tool's).
SETPRIV = shutil.which("setpriv") if sys.platform == "linux" else None


@dataclass(frozen=True)
class ToolRun:
    seconds: float
    max_rss_bytes: int
    tail: str


def run_tool(cmd: Sequence[str | Path], *, name: str, label: str, env: Mapping[str, str] | None = None,
             cwd: Path | None = None, progress: re.Pattern[str] | None = None, total: int | None = None,
             tail_lines: int = 30) -> ToolRun:
    """Run ``cmd``; ``progress`` is a regex whose groups ``done`` (and optionally ``total``) drive the bar.

    Tools that record their input paths in their output (llama.cpp writes the imatrix dataset and file names
    into GGUF metadata) must get relative paths and ``cwd``, or the bytes would depend on where the store is.

    Raises:
        ToolError: non-zero exit, with the last lines of the tool's output.
    """
    start = time.perf_counter()
    proc = start_tool(cmd, name=name, env=env, cwd=cwd, die_with_parent=True)
    return follow_tool(proc, name=name, label=label, progress=progress, total=total, tail_lines=tail_lines,
                       start=start)


def start_tool(cmd: Sequence[str | Path], *, name: str, env: Mapping[str, str] | None = None,
               cwd: Path | None = None, stdin: int | None = None, die_with_parent: bool = False) -> subprocess.Popen:
    """Start ``cmd`` with its output piped for ``follow_tool`` (``stdin=subprocess.PIPE`` to talk to it first).

    ``die_with_parent``: the tool gets SIGKILL if the thread that started it dies (a run killed with SIGKILL leaves
    no tool running); only for a tool that its starting thread waits for.
    """
    argv = [str(c) for c in cmd]
    if die_with_parent and SETPRIV:
        argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=stdin,
                                env={**os.environ, **(env or {})}, cwd=cwd)
    except FileNotFoundError:
        # llama.cpp's tools are located (with their own install hint) before they get here
        raise ToolError(f"{name}: {argv[0]} not found; install it or put it on PATH") from None


def follow_tool(proc: subprocess.Popen, *, name: str, label: str, progress: re.Pattern[str] | None = None,
                total: int | None = None, tail_lines: int = 30, start: float | None = None) -> ToolRun:
    """Stream a started tool's output until it exits; its seconds count from ``start`` (default: now)."""
    start = time.perf_counter() if start is None else start
    tail: deque[str] = deque(maxlen=tail_lines)
    bar = reporter().bar(label, total=total)
    buf = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(1 << 16):
        buf += chunk
        *lines, buf = _SPLIT.split(buf)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            tail.append(line)
            if progress and (m := progress.search(line)):
                groups = m.groupdict()
                bar.update(int(groups["done"]), total=int(groups["total"]) if groups.get("total") else None)
    if buf.strip():
        tail.append(buf.decode(errors="replace").rstrip())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    bar.close()
    if proc.returncode != 0:
        if interrupts.stopping():  # its death is the stop's doing: the tool's last lines say nothing about it
            raise ToolError(f"{name} stopped: this process is being stopped", returncode=proc.returncode)
        last = " | ".join(list(tail)[-5:])
        raise ToolError(f"{name} failed with exit code {proc.returncode}: {last}", returncode=proc.returncode)
    return ToolRun(seconds, usage.ru_maxrss * 1024, "\n".join(tail))
