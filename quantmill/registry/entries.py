"""The team registry: human names -> published artifacts, versioned, in a folder or a bucket of one layout.

    registry/<name>/v<N>/entry.json          what was published: artifact key and digest, metrics, publish record
    registry/<name>/v<N>/README.md           the model card
    registry/<name>/v<N>/report.html         its validation page
    registry/<name>/v<N>/provenance.json     the artifact's provenance record (in-toto Statement), exact bytes
    registry/<name>/v<N>/provenance.sig.json its DSSE signature, when the publisher signs
    registry/<name>/v<N>/lineage.json        the provenance of every artifact it was made from (base -> ... -> it)
    registry/<name>/tags.json                tag -> version (``promote NAME --tag stable``)
    index.html                               the catalogue page
    objects/<key>/...                        the artifact files (the store's layout: local folder or S3)

A version appears whole or not at all: a folder is renamed into place; in a bucket its files go under an upload id
and ``entry.json``, written last with a conditional put, names that id. Publishing the same artifact under the same
name with the same publish record adds no version.
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any, Iterable

from quantmill.errors import IntegrityError, NotFound, QuantmillError
from quantmill.registry.locations import Location
from quantmill.registry.names import (
    CARD,
    CATALOGUE,
    ENTRY,
    LINEAGE,
    PROVENANCE,
    REPORT,
    SIGNATURE,
    TAG_PATTERN,
    TAGS,
    check_name,
)
from quantmill.store.local import ArtifactRef, Store


class ArtifactRegistry:
    """Names, versions and tags over a ``Location``; the artifact files live in ``store``."""

    def __init__(self, location: Location, store: Store):
        self.location, self.store = location, store
        self.root = location.uri

    # names and versions
    def names(self) -> list[str]:
        return [n for n in self.location.children("") if n != CATALOGUE and self.versions(n)]

    def versions(self, name: str) -> list[int]:
        return self.location.versions(check_name(name))

    def tags(self, name: str) -> dict[str, int]:
        data = self.location.read(f"{check_name(name)}/{TAGS}")
        return json.loads(data) if data else {}

    def resolve(self, name: str, version: int | str | None = None) -> tuple[str, int]:
        """``NAME``, ``NAME:vN``, ``NAME:TAG`` (or the version argument) -> (name, version); suggests on a miss."""
        if version is None and ":" in name:
            name, version = name.split(":", 1)
        check_name(name)
        versions = self.versions(name)
        if not versions:
            close = _closest(name, self.names())
            hint = f"; did you mean {close!r}?" if close else ""
            raise NotFound(f"no published artifact named {name!r} in {self.root}{hint}")
        if version is None:
            return name, versions[-1]
        if isinstance(version, str) and not re.fullmatch(r"v?\d+", version):
            tags = self.tags(name)
            if version not in tags:
                raise NotFound(f"{name!r} has no tag {version!r}; tags: {', '.join(sorted(tags)) or 'none'} "
                               f"(add one with `quantmill registry promote {name} --tag {version}`)")
            version = tags[version]
        v = int(str(version).lstrip("v"))
        if v not in versions:
            raise NotFound(f"{name!r} has no version v{v}; versions: {', '.join(f'v{x}' for x in versions)}")
        return name, v

    def get(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        name, v = self.resolve(name, version)
        return json.loads(self.location.read_version(name, v, ENTRY))

    def file(self, name: str, version: int, file: str) -> bytes | None:
        return self.location.read_version(name, version, file)

    def card(self, name: str, version: int) -> str:
        return (self.file(name, version, CARD) or b"").decode()

    def entries(self) -> list[dict[str, Any]]:
        """The latest version of every name, with its tags."""
        out = []
        for name in self.names():
            entry = self.get(name)
            tags = self.tags(name)
            out.append({**entry, "tags": sorted(t for t, v in tags.items() if v == entry["version"])})
        return out

    def all_versions(self) -> list[dict[str, Any]]:
        return [self.get(n, v) for n in self.names() for v in self.versions(n)]

    def find(self, name: str, artifact_digest: str, validated: bool) -> dict[str, Any] | None:
        """The version of ``name`` that already holds these bytes with this validation verdict, if any: a new
        version means new bytes or a new verdict, never a re-run with other settings (``--force``, a new card)."""
        for v in reversed(self.versions(name)):
            entry = self.get(name, v)
            if entry["artifact"]["digest"] == artifact_digest and bool(entry.get("validated")) == bool(validated):
                return entry
        return None

    # writing
    def publish(self, name: str, entry: dict[str, Any], card: str, *, provenance: bytes | None = None,
                signature: bytes | None = None, lineage: list[dict[str, Any]] | None = None,
                report: bytes | None = None) -> dict[str, Any]:
        """Add ``entry`` as the next version of ``name`` (whole or not at all), unless an identical one exists."""
        check_name(name)
        existing = self.find(name, entry["artifact"]["digest"], entry.get("validated", False))
        if existing:
            return existing
        while True:
            version = (self.versions(name) or [0])[-1] + 1
            record = {**entry, "name": name, "version": version, "signed": signature is not None,
                      "pages": [REPORT] if report is not None else []}
            files = {CARD: card.encode(), ENTRY: (json.dumps(record, indent=1) + "\n").encode()}
            if report is not None:
                files[REPORT] = report
            if provenance is not None:
                files[PROVENANCE] = provenance
            if signature is not None:
                files[SIGNATURE] = signature
            if lineage is not None:
                files[LINEAGE] = (json.dumps(lineage, indent=1) + "\n").encode()
            if self.location.commit_version(name, version, files):
                return record

    def promote(self, name: str, tag: str, version: int | str | None = None) -> int:
        if not TAG_PATTERN.match(tag):
            raise QuantmillError(f"tag {tag!r} is invalid; use a letter then letters, digits, '.', '_' or '-'")
        name, v = self.resolve(name, version)
        tags = self.tags(name)
        tags[tag] = v
        self.location.put(f"{name}/{TAGS}", (json.dumps(tags, indent=1, sort_keys=True) + "\n").encode())
        return v

    # reading artifacts back, verified
    def artifact_ref(self, entry: dict[str, Any]) -> ArtifactRef:
        return ArtifactRef(entry["artifact"]["key"], entry["artifact"]["digest"], "")

    def signed_record(self, name: str, version: int, keys: list | None, *, require: bool) -> tuple[dict, bytes,
                                                                                                   str | None]:
        """(statement, its exact bytes, signing key id or None), the signature checked against ``keys``."""
        from quantmill.store import provenance as prov
        from quantmill.store import signing

        entry = self.get(name, version)
        what = f"{name}:v{version}"
        record = self.file(name, version, PROVENANCE)
        if record is None:  # published before records were kept beside entries: the store's record
            record = json.dumps(self.store.statement(entry["artifact"]["key"]), indent=1).encode()
        signature = self.file(name, version, SIGNATURE)
        signer = None
        if signature is not None and keys:
            signer = signing.verify(record, signature, keys, what=what)
        elif require:
            raise signing.SignatureError(f"{what}: " + ("not signed; it cannot be verified against trusted keys"
                                                        if signature is None else "no trusted keys given"))
        statement = json.loads(record)
        if prov.artifact_digest_of(statement) != entry["artifact"]["digest"]:
            raise IntegrityError(f"{what}: its provenance record names artifact {prov.artifact_digest_of(statement)}, "
                                 f"the registry entry {entry['artifact']['digest']}: the record was altered")
        return statement, record, signer


def _closest(name: str, names: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return match[0] if match else None


def copy_artifact(source: Store, target: Store, ref: ArtifactRef) -> ArtifactRef:
    """Put ``ref`` (files and provenance record) into ``target`` unless it holds it; checked by digest."""
    from quantmill.store import provenance as prov

    existing = target.lookup(ref.key)
    if existing is not None:
        if existing.digest != ref.digest:
            raise IntegrityError(f"artifact {ref.key}: {target.uri} holds digest {existing.digest}, not {ref.digest}")
        return existing
    statement = source.statement(ref.key)
    files = source.files(ref)
    with target.stage(ref.key) as staging:
        for subject in prov.subjects_of(statement):
            dst = staging.files / subject.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files / subject.path, dst)

        def same_record(subjects, digest):
            if digest != ref.digest:
                raise IntegrityError(f"artifact {ref.key}: copied files digest to {digest}, not {ref.digest}")
            return statement

        return target.commit(staging, same_record)


def lineage(store: Store, key: str) -> list[dict[str, Any]]:
    """Every artifact ``key`` was made from, nearest first: key, step, spec, digest, inputs (name -> key)."""
    from quantmill.store import provenance as prov

    out, seen, todo = [], set(), [key]
    while todo:
        k = todo.pop(0)
        if k in seen:
            continue
        seen.add(k)
        statement = store.statement(k)
        build = statement["predicate"]["buildDefinition"]
        inputs = {d["name"].removeprefix("input:"): d["annotations"]["key"] for d in build["resolvedDependencies"]
                  if d.get("name", "").startswith("input:") and "key" in d.get("annotations", {})}
        sources = [{"name": d["name"], "uri": d.get("uri"), "digest": d.get("digest")}
                   for d in build["resolvedDependencies"] if d.get("name") in ("model", "adapter")]
        out.append({"key": k, "step": build["externalParameters"]["step"], "spec": build["externalParameters"]["spec"],
                    "digest": prov.artifact_digest_of(statement), "inputs": inputs, "sources": sources})
        todo += list(inputs.values())
    return out


def parse_names(names: Iterable[str]) -> list[str]:
    return [check_name(n) for n in names]
