"""The content-addressed artifact store.

An artifact is a directory of files addressed by its cache key (a hash of everything that determines its
bytes) and identified by its digest (a hash of its file listing). Steps write into a staging directory; commit
hashes the files, writes the provenance record last, and makes the artifact visible in one atomic rename, so a
reader never sees a partial artifact and a crash leaves only staging debris.

The local directory store lives here; other backends (S3) implement the same ``Store`` interface.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from quantmill import constants as C
from quantmill.digest import DigestCache, FileDigest, digest_tree, manifest_digest
from quantmill.errors import IntegrityError, NotFound, StoreError, StoreFullError
from quantmill.store import provenance
from quantmill.store.owners import OWNER_FILE
from quantmill.toolchain import interrupts

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class ArtifactRef:
    """What tasks pass around instead of weights: the key, the content digest and where the artifact lives."""

    key: str
    digest: str
    uri: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


class Store(ABC):
    """Interface shared by every store backend."""

    uri: str

    @abstractmethod
    def lookup(self, key: str) -> ArtifactRef | None:
        """The committed artifact for ``key``, or None."""

    @abstractmethod
    def stage(self, key: str) -> "Staging":
        """A fresh staging area for ``key``; use as a context manager (removed on exit unless committed)."""

    @abstractmethod
    def commit(self, staging: "Staging", build_statement: Callable[[list[FileDigest], str], dict]) -> ArtifactRef:
        """Hash the staged files, write provenance last, publish atomically. Returns the committed ref."""

    @abstractmethod
    def files(self, ref: ArtifactRef) -> Path:
        """A local directory with the artifact's files (verified against its digest for remote stores)."""

    @abstractmethod
    def statement(self, key: str) -> dict[str, Any]:
        """The artifact's provenance statement."""

    @abstractmethod
    def verify(self, key: str) -> list[str]:
        """Problems found re-hashing the artifact's files against its provenance (empty: intact)."""

    @abstractmethod
    def file_path(self, key: str, path: str) -> str:
        """A committed file's place relative to the store's root (the catalogue page links to it)."""

    @abstractmethod
    def state_dir(self) -> Path:
        """A local directory for caches the store keeps about itself (digest cache)."""

    def read_file(self, ref: ArtifactRef, path: str) -> bytes:
        """One small file of an artifact, checked against its provenance (without fetching the rest)."""
        return (self.files(ref) / path).read_bytes()

    def damaged(self, ref: ArtifactRef) -> list[str]:
        """What no longer matches ``ref``'s provenance record, one line per file (cheap: stat data, re-hashing
        only what changed since it was hashed); empty when intact. Stores that check on fetch return []."""
        return []

    def set_aside(self, key: str) -> str:
        """Move a damaged artifact out of the store's objects; where it went."""
        raise NotImplementedError

    def lookup_intact(self, key: str, what: str) -> ArtifactRef | None:
        """``lookup``, where a damaged hit is reported in one line, set aside, and answered as a miss (rebuilt)."""
        found = self.lookup(key)
        if found is None:
            return None
        problems = self.damaged(found)
        if not problems:
            return found
        from quantmill import progress

        where = self.set_aside(key)
        progress.warn(f"{what}: cached artifact {key[:12]} is damaged ({problems[0]}"
                      f"{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}); moved to {where}, rebuilding it")
        return None

    def key_lock(self, key: str) -> AbstractContextManager[None]:
        """Held while this process computes ``key``: another process computing it waits, then finds it committed.
        Stores whose commits are conditional writes (S3) keep the first commit instead and need none."""
        return nullcontext()

    def read_result(self, ref: ArtifactRef) -> dict[str, Any]:
        """The small JSON result its step wrote beside the artifact's files."""
        return json.loads(self.read_file(ref, C.RESULT_FILE))

    def fetch_file(self, key: str, path: str, dst: Path) -> None:
        """Copy one committed file of ``key`` to ``dst`` from the store itself (never a cache); unchecked."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Every committed artifact key."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove a committed artifact (``registry gc``): its record first, so it is never half visible."""
        raise NotImplementedError

    def digest_cache(self) -> DigestCache:
        """sha256 of local files by inode, so a large file is hashed once (see ``DigestCache``)."""
        return DigestCache(self.state_dir() / C.DIGEST_CACHE_FILE)


class Staging:
    """A staging directory; ``files`` is where a step writes its outputs."""

    def __init__(self, store: "LocalStore", key: str, root: Path):
        self.store, self.key, self.root = store, key, root
        self.files = root / C.FILES_DIR
        self.committed: ArtifactRef | None = None

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        if exc is not None and is_disk_full(exc):
            raise self.store.full_error(exc) from exc


class LocalStore(Store):
    """Artifacts in a local directory: ``<root>/objects/<key>/{files/, provenance.json}``."""

    def __init__(self, root: str | Path, quota_bytes: int | None = None):
        self.root = Path(root).expanduser().resolve()
        self.quota_bytes = quota_bytes
        self.uri = self.root.as_uri()
        for sub in (C.OBJECTS_DIR, C.STAGING_DIR, C.STATE_DIR):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"store root {self.root}: cannot create {sub}/ ({e.strerror}); "
                                 f"set store.root to a writable directory") from e

    # -- reading -----------------------------------------------------------------------------------------
    def _object(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise NotFound(f"artifact key {key!r} is not a hex digest")
        return self.root / C.OBJECTS_DIR / key

    def lookup(self, key: str) -> ArtifactRef | None:
        record = self._object(key) / C.PROVENANCE_FILE
        try:
            stmt = json.loads(record.read_text())
        except FileNotFoundError:
            return None
        return ArtifactRef(key, provenance.artifact_digest_of(stmt), self._object(key).as_uri())

    def statement(self, key: str) -> dict[str, Any]:
        try:
            return json.loads((self._object(key) / C.PROVENANCE_FILE).read_text())
        except FileNotFoundError:
            raise NotFound(f"no artifact with key {key} in store {self.root}") from None

    def files(self, ref: ArtifactRef) -> Path:
        path = self._object(ref.key) / C.FILES_DIR
        if not path.is_dir():
            raise NotFound(f"no artifact with key {ref.key} in store {self.root}")
        return path

    def verify(self, key: str) -> list[str]:
        return provenance.verify(self.statement(key), self._object(key) / C.FILES_DIR)

    def file_path(self, key: str, path: str) -> str:
        """A committed file's place relative to the store's root (the catalogue page links to it)."""
        return f"{C.OBJECTS_DIR}/{self._object(key).name}/{C.FILES_DIR}/{path}"

    def key_for_digest(self, digest: str) -> str | None:
        try:
            return (self.root / C.STATE_DIR / C.DIGEST_INDEX_DIR / digest.removeprefix("sha256:")).read_text()
        except FileNotFoundError:
            return None

    def state_dir(self) -> Path:
        return self.root / C.STATE_DIR

    def fetch_file(self, key: str, path: str, dst: Path) -> None:
        shutil.copyfile(self._object(key) / C.FILES_DIR / path, dst)

    def keys(self) -> list[str]:
        objects = self.root / C.OBJECTS_DIR
        return sorted(p.name for p in objects.iterdir() if (p / C.PROVENANCE_FILE).is_file())

    def delete(self, key: str) -> None:
        target = self._object(key)
        trash = self.root / C.STAGING_DIR / f"deleted-{key[:16]}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)  # gone from lookups at once; then the bytes
        shutil.rmtree(trash)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / C.OBJECTS_DIR).rglob("*") if p.is_file())

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- writing -----------------------------------------------------------------------------------------
    def stage(self, key: str) -> Staging:
        root = self.root / C.STAGING_DIR / f"{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            (root / C.FILES_DIR).mkdir(parents=True)
            from quantmill.store.owners import mark_owner

            mark_owner(root)
        except OSError as e:
            if is_disk_full(e):
                raise self.full_error(e) from e
            raise
        return Staging(self, key, root)

    def full_error(self, exc: BaseException | None = None, need: int | None = None) -> StoreFullError:
        if self.quota_bytes is not None and (exc is None or not is_disk_full(exc)):
            what = f"over its quota of {self.quota_bytes} bytes"
            fix = "raise store.quota_bytes or delete old artifacts"
        else:
            what = f"out of disk space ({self.free_bytes()} bytes free)"
            fix = "free space or set store.root to a larger disk"
        need_s = f", needs {need} bytes more" if need else ""
        return StoreFullError(f"store {self.root} is {what}{need_s}; nothing was committed; {fix}")

    def commit(self, staging: Staging, build_statement: Callable[[list[FileDigest], str], dict]) -> ArtifactRef:
        cache = self.digest_cache()
        subjects = digest_tree(staging.files, hasher=cache.sha256)
        cache.save()
        size = sum(f.size for f in subjects)
        if self.quota_bytes is not None and self.used_bytes() + size > self.quota_bytes:
            raise self.full_error(need=self.used_bytes() + size - self.quota_bytes)
        digest = manifest_digest(subjects)
        stmt = build_statement(subjects, digest)
        (staging.root / OWNER_FILE).unlink(missing_ok=True)  # the staging folder's owner, not part of the artifact
        record = staging.root / C.PROVENANCE_FILE
        with open(record, "w") as f:  # the commit marker: written after every file it describes
            json.dump(stmt, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        target = self._object(staging.key)
        if interrupts.stopping():
            raise StoreError(f"store {self.root}: not committing {staging.key[:12]}: the run is being stopped")
        try:
            os.rename(staging.root, target)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another run committed the same key first; same key means same inputs, so keep theirs.
            existing = self.lookup(staging.key)
            if existing is None:  # an incomplete commit of an earlier run: set it aside, this one is whole
                self.set_aside(staging.key)
                os.rename(staging.root, target)
            else:
                return existing
        index = self.root / C.STATE_DIR / C.DIGEST_INDEX_DIR
        index.mkdir(parents=True, exist_ok=True)
        tmp = index / f".{uuid.uuid4().hex}"
        tmp.write_text(staging.key)
        os.replace(tmp, index / digest.removeprefix("sha256:"))
        staging.committed = ArtifactRef(staging.key, digest, target.as_uri())
        return staging.committed

    def damaged(self, ref: ArtifactRef) -> list[str]:
        files, cache, problems = self._object(ref.key) / C.FILES_DIR, self.digest_cache(), []
        for subject in provenance.subjects_of(self.statement(ref.key)):
            path = files / subject.path
            if not path.is_file():
                problems.append(f"{subject.path} is missing")
            elif path.stat().st_size != subject.size or cache.sha256(path) != subject.sha256:
                problems.append(f"{subject.path} does not match its provenance record")
        cache.save()
        return problems

    @contextmanager
    def key_lock(self, key: str) -> Iterator[None]:
        import fcntl

        locks = self.root / C.STATE_DIR / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / key[:32], "a") as handle:  # flock: released by the kernel if this process dies
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def set_aside(self, key: str) -> str:
        target = self.root / C.DAMAGED_DIR / f"{key}.{uuid.uuid4().hex[:8]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._object(key), target)
        return str(target)

    def verified_files(self, ref: ArtifactRef) -> Path:
        """Files of ``ref``, checked against its provenance before a step may read them.

        Every file is compared with its recorded sha256 through the digest cache: a file untouched since it
        was hashed costs a stat; one modified since (an in-place edit of a hardlinked source, a flipped byte)
        is hashed again and refused.
        """
        found = self.lookup(ref.key)
        if found is None:
            raise NotFound(f"no artifact with key {ref.key} in store {self.root}")
        if found.digest != ref.digest:
            raise IntegrityError(f"artifact {ref.key}: digest {found.digest} != expected {ref.digest}; "
                                 f"the store was modified; delete {self._object(ref.key)} and re-run")
        files = self.files(ref)
        cache = self.digest_cache()
        for subject in provenance.subjects_of(self.statement(ref.key)):
            path = files / subject.path
            if not path.is_file() or cache.sha256(path) != subject.sha256:
                raise IntegrityError(f"artifact {ref.key}: {subject.path} does not match its provenance record "
                                     f"(modified after commit); delete {self._object(ref.key)} and re-run")
        cache.save()
        return files
