"""``quantmill store check [--repair]``: what in a local store is not what it should be, and putting it right.

Three kinds of problem: an object folder without its provenance record (a commit that cannot have completed:
the record is written last), an object whose files no longer match its record, and staging folders that no
live process owns (a step killed mid-way). Repair moves the first two aside (``damaged/``: nothing is deleted
that someone may want to look at) and removes the third. Every run removes stale staging itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from quantmill import constants as C
from quantmill.store.local import ArtifactRef, LocalStore
from quantmill.store.owners import owned_by_a_live_process


@dataclass
class Report:
    without_record: list[str] = field(default_factory=list)  # object folders (keys)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # key -> problems
    stale_staging: list[str] = field(default_factory=list)  # staging folder names
    repaired: list[str] = field(default_factory=list)  # one line per action taken

    @property
    def clean(self) -> bool:
        return not (self.without_record or self.damaged or self.stale_staging)

    def lines(self) -> list[str]:
        return ([f"objects/{k}: no provenance record (an incomplete commit)" for k in self.without_record]
                + [f"objects/{k}: {p}" for k, problems in self.damaged.items() for p in problems]
                + [f"staging/{s}: left by a process that is gone" for s in self.stale_staging])

    def to_json(self) -> dict:
        return {"clean": self.clean, "without_record": self.without_record, "damaged": self.damaged,
                "stale_staging": self.stale_staging, "repaired": self.repaired}


def check(store: LocalStore, *, repair: bool = False, full: bool = False) -> Report:
    """Look at every object and staging folder; with ``repair``, put right what was found. ``full`` re-hashes
    every file instead of trusting the stat data recorded when it was last hashed."""
    report = Report()
    for folder in sorted((store.root / C.OBJECTS_DIR).iterdir()):
        if not (folder / C.PROVENANCE_FILE).is_file():
            report.without_record.append(folder.name)
            continue
        statement = store.statement(folder.name)
        from quantmill.store import provenance

        ref = ArtifactRef(folder.name, provenance.artifact_digest_of(statement), folder.as_uri())
        problems = store.verify(folder.name) if full else store.damaged(ref)
        if problems:
            report.damaged[folder.name] = problems
    report.stale_staging = [p.name for p in stale_staging(store)]
    if repair:
        for key in [*report.without_record, *report.damaged]:
            report.repaired.append(f"objects/{key} moved to {store.set_aside(key)}")
        report.repaired += remove_stale_staging(store)
    return report


def stale_staging(store: LocalStore) -> list[Path]:
    staging = store.root / C.STAGING_DIR
    return sorted(p for p in staging.iterdir() if p.is_dir() and not owned_by_a_live_process(p)) \
        if staging.is_dir() else []


def remove_stale_staging(store: LocalStore) -> list[str]:
    """Remove the staging folders no live process owns; one line per folder removed."""
    removed = []
    for path in stale_staging(store):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(f"staging/{path.name} removed")
    return removed
