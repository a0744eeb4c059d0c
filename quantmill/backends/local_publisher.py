"""The local registry: human names -> artifact digests, versioned, inside the local store.

Layout: ``<store root>/registry/<name>/v<N>/{entry.json, README.md}``. Publishing the same artifact under the
same name again adds no version; a different artifact under the name adds ``v<N+1>``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from quantmill import constants as C
from quantmill.backends import PUBLISHERS
from quantmill.errors import NotFound, PublishRefused

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise PublishRefused(f"registry name {name!r} is invalid; use letters, digits, '.', '_' and '-' "
                             f"(no path separators or '..')")
    return name


class LocalPublisher:
    key = "local"

    def registry(self, store_root: Path) -> "LocalRegistry":
        return LocalRegistry(store_root / C.REGISTRY_DIR)


class LocalRegistry:
    def __init__(self, root: Path):
        self.root = root

    def versions(self, name: str) -> list[int]:
        d = self.root / check_name(name)
        return sorted(int(p.name[1:]) for p in d.glob("v*") if p.name[1:].isdigit()) if d.is_dir() else []

    def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        versions = self.versions(name)
        if not versions:
            close = _closest(name, self.names())
            hint = f"; did you mean {close!r}?" if close else ""
            raise NotFound(f"no published artifact named {name!r} in {self.root}{hint}")
        v = versions[-1] if version is None else version
        path = self.root / name / f"v{v}" / C.REGISTRY_ENTRY_FILE
        if not path.is_file():
            raise NotFound(f"{name!r} has no version v{v}; versions: {', '.join(f'v{x}' for x in versions)}")
        return json.loads(path.read_text())

    def card(self, name: str, version: int) -> str:
        return (self.root / name / f"v{version}" / C.MODEL_CARD_FILE).read_text()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def entries(self) -> list[dict[str, Any]]:
        return [self.get(n) for n in self.names() if self.versions(n)]

    def find(self, name: str, artifact_digest: str, publish_key: str) -> dict[str, Any] | None:
        """The version of ``name`` that already holds this artifact with this publish record, if any."""
        for v in reversed(self.versions(name)):
            entry = self.get(name, v)
            if entry["artifact"]["digest"] == artifact_digest and entry["publish_key"] == publish_key:
                return entry
        return None

    def publish(self, name: str, entry: dict[str, Any], card: str) -> dict[str, Any]:
        """Add ``entry`` as the next version of ``name`` (atomically), unless an identical one exists."""
        check_name(name)
        existing = self.find(name, entry["artifact"]["digest"], entry["publish_key"])
        if existing:
            return existing
        (self.root / name).mkdir(parents=True, exist_ok=True)
        while True:
            version = (self.versions(name) or [0])[-1] + 1
            staging = self.root / name / f".v{version}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            record = {**entry, "name": name, "version": version}
            (staging / C.MODEL_CARD_FILE).write_text(card)
            (staging / C.REGISTRY_ENTRY_FILE).write_text(json.dumps(record, indent=1) + "\n")
            try:
                os.rename(staging, self.root / name / f"v{version}")
                return record
            except OSError:  # a concurrent publisher took this version number: take the next one
                for p in staging.iterdir():
                    p.unlink()
                staging.rmdir()


def _closest(name: str, names: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return match[0] if match else None


PUBLISHERS.register(LocalPublisher.key)(LocalPublisher())
