"""Where a team registry lives: a folder (``LocalLocation``) or a prefix of a bucket (``S3Location``), one layout
(see ``quantmill.registry.entries``), each making a version visible whole or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from quantmill.errors import QuantmillError
from quantmill.registry.names import ENTRY
from quantmill.store.s3 import explain_client_error


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
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(e) from e
        except BotoCoreError as e:  # no credentials, an unreachable endpoint: one line, as for the store
            raise self._error(e) from e

    def read(self, path: str) -> bytes | None:
        response = self._get(self._key(path))
        return response["Body"].read() if response else None

    def put(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, ContentType=content_type)

    def _list(self, prefix: str, delimiter: str = "/") -> tuple[list[str], list[str]]:
        """(sub-folder names, object names) directly under ``prefix``."""
        from botocore.exceptions import BotoCoreError, ClientError

        folders, objects = [], []
        base = self._key(prefix).rstrip("/") + "/" if self._key(prefix) else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                              Delimiter=delimiter):
                folders += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                objects += [o["Key"][len(base):] for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as e:
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
