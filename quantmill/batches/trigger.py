"""Runs a change to ``conf/`` calls for: every run at two git revisions, composed, compared by fingerprint.

A run whose fingerprint differs between base and head, or that is new at head, is to run; one that vanished is
reported and never run. Comments, key order and formatting never change a fingerprint, so they trigger nothing;
a shared group file (``conf/calibration/default.yaml``) changes every run that uses it.
The code composing both revisions is this checkout's (its schemas); only ``conf/`` is read at each revision.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from quantmill.batches.batch import Run, all_runs, changed_paths
from quantmill.errors import ConfigError, QuantmillError


class TriggerError(QuantmillError):
    """A revision is unknown, or conf/ does not compose at the head revision."""


@dataclass(frozen=True)
class Change:
    run: Run
    action: str  # "run" or "removed"
    why: str

    def to_json(self) -> dict:
        return {**self.run.to_json(), "action": self.action, "why": self.why}


def _git(repo: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True)
    if proc.returncode:
        raise TriggerError(f"git {' '.join(args)} in {repo} failed: {proc.stderr.decode().strip().splitlines()[-1]}")
    return proc.stdout


def resolve_rev(repo: Path, rev: str) -> str:
    """The commit a revision names; one line if there is none (or ``repo`` is not a git repository)."""
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode:
        if subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-dir"], capture_output=True).returncode:
            raise TriggerError(f"{repo} is not a git repository; run the trigger inside the project's checkout")
        raise TriggerError(f"revision {rev!r} does not exist in {repo}; give a commit, branch or tag "
                           f"(`git log --oneline` lists them)")
    return proc.stdout.strip()


def conf_at(repo: Path, commit: str, conf_path: str, into: Path) -> Path | None:
    """Extract ``conf_path`` (relative to ``repo``) as it is at ``commit`` into ``into/conf``; None if absent."""
    prefix = _git(repo, "rev-parse", "--show-prefix").decode().strip()
    tree = f"{commit}:{prefix}{conf_path.strip('/')}"
    if subprocess.run(["git", "-C", str(repo), "cat-file", "-e", tree], capture_output=True).returncode:
        return None
    with tarfile.open(fileobj=BytesIO(_git(repo, "archive", "--format=tar", tree)), mode="r:") as tar:
        tar.extractall(into / "conf", filter="data")
    return into / "conf"


def runs_at(repo: Path, commit: str, conf_path: str, work: Path, *, label: str) -> list[Run]:
    conf_dir = conf_at(repo, commit, conf_path, work)
    if conf_dir is None:
        return []
    try:
        return all_runs(conf_dir)
    except ConfigError as e:
        cause = e.__cause__.__cause__ if e.__cause__ is not None and e.__cause__.__cause__ is not None else e.__cause__
        hydra = " ".join(line.strip() for line in str(cause or "").strip().splitlines()[:2])
        where = re.search(r"In '([\w/.-]+)'", hydra)
        file = f" ({conf_path}/{where.group(1)}.yaml)" if where else ""
        raise TriggerError(f"conf/ does not compose at {label} {commit[:12]}{file}: {e}"
                           f"{f' (Hydra: {hydra})' if hydra else ''}; nothing was submitted") from e


def changes(repo: Path, base: str, head: str, conf_path: str = "conf") -> tuple[str, str, list[Change]]:
    """(base commit, head commit, what to run and what was removed), in head's order, then removals."""
    base_commit, head_commit = resolve_rev(repo, base), resolve_rev(repo, head)
    with tempfile.TemporaryDirectory(prefix="quantmill-trigger-") as tmp:
        head_runs = runs_at(repo, head_commit, conf_path, Path(tmp) / "head", label="head")
        try:
            base_runs = {r.id: r for r in runs_at(repo, base_commit, conf_path, Path(tmp) / "base", label="base")}
        except TriggerError as e:  # a broken base is what this commit fixes: everything at head runs
            base_runs, broken = {}, str(e)
        else:
            broken = ""
    out = []
    for run in head_runs:
        old = base_runs.pop(run.id, None)
        if old is None:
            out.append(Change(run, "run", "new" + (" (base did not compose)" if broken else "")))
        elif old.fingerprint != run.fingerprint:
            out.append(Change(run, "run", "; ".join(changed_paths(old.fingerprint, run.fingerprint))))
    out += [Change(run, "removed", "not in conf/ at head; nothing runs") for run in base_runs.values()]
    return base_commit, head_commit, out
