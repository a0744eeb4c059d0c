"""The team registry: human names -> published artifacts, versioned, in a folder or a bucket of one layout.

    registry/<name>/v<N>/entry.json          what was published: artifact key and digest, metrics, publish record
    registry/<name>/v<N>/README.md           the model card
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
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

from quantmill import constants as C
from quantmill.errors import IntegrityError, NotFound, PublishRefused, QuantmillError
from quantmill.store.s3 import explain_client_error
from quantmill.store.local import ArtifactRef, Store

ENTRY, CARD, PROVENANCE, SIGNATURE, LINEAGE, TAGS = (C.REGISTRY_ENTRY_FILE, C.MODEL_CARD_FILE, "provenance.json",
                                                     "provenance.sig.json", "lineage.json", "tags.json")
CATALOGUE = "index.html"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise PublishRefused(f"registry name {name!r} is invalid; use letters, digits, '.', '_' and '-' "
                             f"(no path separators or '..')")
    return name


# -- where a registry lives ----------------------------------------------------------------------------------
class Location(ABC):
    uri: str

    @abstractmethod
    def read(self, path: str) -> bytes | None:
        """A file's bytes, None if absent."""

    @abstractmethod
    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write (replace) one file; readers see the old or the new bytes, never a part."""

    @abstractmethod
    def children(self, path: str) -> list[str]:
        """Names directly under ``path`` ("" for the root)."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Committed version numbers of ``name``."""

    @abstractmethod
    def commit_version(self, name: str, version: int, files: dict[str, bytes]) -> bool:
        """Make ``files`` (with entry.json) version ``version`` of ``name`` at once; False if it exists already."""

    @abstractmethod
    def read_version(self, name: str, version: int, file: str) -> bytes | None:
        """One file of a committed version."""

    @abstractmethod
    def delete_version(self, name: str, version: int) -> None:
        ...

    def version_path(self, name: str, version: int, file: str) -> str:
        """Where a file of a committed version is, relative to the registry root (links of the catalogue page)."""
        return f"{name}/v{version}/{file}"


class LocalLocation(Location):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = self.root.resolve().as_uri()

    def read(self, path: str) -> bytes | None:
        try:
            return (self.root / path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        tmp.replace(target)

    def children(self, path: str) -> list[str]:
        d = self.root / path
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def versions(self, name: str) -> list[int]:
        return sorted(int(v[1:]) for v in self.children(name) if v[:1] == "v" and v[1:].isdigit())

    def commit_version(self, name: str, version: int, files: dict[str, bytes]) -> bool:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = self.root / name / f".v{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        for file, data in files.items():
            (staging / file).write_bytes(data)
        try:
            os.rename(staging, self.root / name / f"v{version}")
            return True
        except OSError:  # a concurrent publisher took this version number
            shutil.rmtree(staging)
            return False

    def read_version(self, name: str, version: int, file: str) -> bytes | None:
        return self.read(f"{name}/v{version}/{file}")

    def delete_version(self, name: str, version: int) -> None:
        shutil.rmtree(self.root / name / f"v{version}", ignore_errors=True)


class S3Location(Location):
    """A registry in a bucket (AWS, MinIO, R2); credentials come from the environment."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._uploads: dict[tuple[str, int], str] = {}

    def _key(self, path: str) -> str:
        return "/".join(p for p in (self.prefix, path) if p)

    def _error(self, exc) -> QuantmillError:
        """The S3 store's one-line error for ``exc``, naming the publish settings."""
        return explain_client_error(exc, self.bucket, self.client.meta.endpoint_url, setting="publish")

    def _get(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(e) from e

    def read(self, path: str) -> bytes | None:
        response = self._get(self._key(path))
        return response["Body"].read() if response else None

    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, ContentType=content_type)

    def _list(self, prefix: str, delimiter: str = "/") -> tuple[list[str], list[str]]:
        """(sub-folder names, object names) directly under ``prefix``."""
        from botocore.exceptions import ClientError

        folders, objects = [], []
        base = self._key(prefix).rstrip("/") + "/" if self._key(prefix) else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                              Delimiter=delimiter):
                folders += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                objects += [o["Key"][len(base):] for o in page.get("Contents", [])]
        except ClientError as e:
            raise self._error(e) from e
        return folders, objects

    def children(self, path: str) -> list[str]:
        folders, objects = self._list(path)
        return sorted(set(folders) | set(objects))

    def versions(self, name: str) -> list[int]:
        folders, _ = self._list(name)
        found = []
        for v in folders:
            if v[:1] == "v" and v[1:].isdigit() and ENTRY in self._list(f"{name}/{v}")[1]:
                found.append(int(v[1:]))
        return sorted(found)

    def commit_version(self, name: str, version: int, files: dict[str, bytes]) -> bool:
        from botocore.exceptions import ClientError

        upload = uuid.uuid4().hex[:16]
        for file, data in files.items():
            if file != ENTRY:
                self.client.put_object(Bucket=self.bucket, Key=self._key(f"{name}/v{version}/{upload}/{file}"),
                                       Body=data)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(f"{name}/v{version}/{ENTRY}"), Body=files[ENTRY],
                                   IfNoneMatch="*", Metadata={"files": upload}, ContentType="application/json")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise self._error(e) from e
            for file in files:
                if file != ENTRY:
                    self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{name}/v{version}/{upload}/{file}"))
            return False
        self._uploads[(name, version)] = upload
        return True

    def read_version(self, name: str, version: int, file: str) -> bytes | None:
        if file == ENTRY or (name, version) not in self._uploads:
            response = self._get(self._key(f"{name}/v{version}/{ENTRY}"))
            if response is None:
                return None
            self._uploads[(name, version)] = response.get("Metadata", {}).get("files", "")
            if file == ENTRY:
                return response["Body"].read()
        return self.read(f"{name}/v{version}/{self._uploads[(name, version)]}/{file}")

    def version_path(self, name: str, version: int, file: str) -> str:
        if file != ENTRY and (name, version) not in self._uploads:
            self.read_version(name, version, ENTRY)
        return f"{name}/v{version}/{file}" if file == ENTRY else f"{name}/v{version}/{self._uploads[(name, version)]}/{file}"

    def delete_version(self, name: str, version: int) -> None:
        _, objects = self._list(f"{name}/v{version}", delimiter="")
        for obj in objects:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{name}/v{version}/{obj}"))


# -- the registry --------------------------------------------------------------------------------------------
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

    def find(self, name: str, artifact_digest: str, publish_key: str) -> dict[str, Any] | None:
        """The version of ``name`` that already holds this artifact with this publish record, if any."""
        for v in reversed(self.versions(name)):
            entry = self.get(name, v)
            if entry["artifact"]["digest"] == artifact_digest and entry.get("publish_key") == publish_key:
                return entry
        return None

    # writing
    def publish(self, name: str, entry: dict[str, Any], card: str, *, provenance: bytes | None = None,
                signature: bytes | None = None, lineage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Add ``entry`` as the next version of ``name`` (whole or not at all), unless an identical one exists."""
        check_name(name)
        existing = self.find(name, entry["artifact"]["digest"], entry["publish_key"])
        if existing:
            return existing
        while True:
            version = (self.versions(name) or [0])[-1] + 1
            record = {**entry, "name": name, "version": version, "signed": signature is not None}
            files = {CARD: card.encode(), ENTRY: (json.dumps(record, indent=1) + "\n").encode()}
            if provenance is not None:
                files[PROVENANCE] = provenance
            if signature is not None:
                files[SIGNATURE] = signature
            if lineage is not None:
                files[LINEAGE] = (json.dumps(lineage, indent=1) + "\n").encode()
            if self.location.commit_version(name, version, files):
                return record

    def promote(self, name: str, tag: str, version: int | str | None = None) -> int:
        if not _TAG.match(tag):
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
