"""Content hashing: files, directory trees, canonical JSON, and a stat-keyed cache for large local inputs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

CHUNK = 8 << 20


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding that is hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


@dataclass(frozen=True)
class FileDigest:
    """One file of an artifact: its path relative to the artifact root, sha256 and size."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


def list_files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by relative POSIX path; symlinks are refused."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise ValueError(f"{p}: symbolic links are not stored; copy the file instead")
        if p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


HASH_THREADS = 8


def sha256_files(paths: list[Path], hasher: Callable[[Path], str] = sha256_file) -> list[str]:
    """``hasher`` of each path, in order, hashed in parallel threads (hashlib and file reads release the GIL): a
    checkpoint's shards hash in the time of its largest shard on a machine with the cores."""
    from concurrent.futures import ThreadPoolExecutor

    threads = min(HASH_THREADS, os.cpu_count() or 1, len(paths))
    if threads <= 1:
        return [hasher(p) for p in paths]
    with ThreadPoolExecutor(threads, thread_name_prefix="sha256") as pool:
        return list(pool.map(hasher, paths))


def digest_tree(root: Path, files: Iterable[Path] | None = None,
                hasher: Callable[[Path], str] = sha256_file) -> list[FileDigest]:
    """Digest every file under ``root`` (or the given ones), sorted by path."""
    paths = list_files(root) if files is None else sorted(files)
    return [FileDigest(p.relative_to(root).as_posix(), d, p.stat().st_size)
            for p, d in zip(paths, sha256_files(paths, hasher))]


def manifest_digest(files: Iterable[FileDigest]) -> str:
    """The artifact digest: sha256 of the canonical listing of (path, sha256, size)."""
    listing = [f.to_json() for f in sorted(files, key=lambda f: f.path)]
    return "sha256:" + sha256_bytes(canonical_json(listing))


class DigestCache:
    """sha256 of local files keyed by (device, inode) and stamped with (size, mtime), so unchanged multi-GB
    files are not re-read: not on every plan, not when a hardlink of a hashed file is committed, not when an
    artifact is fetched. The same idea as git's index; a changed file misses and is hashed again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._entries: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._entries = {}
        self._dirty = False

    def sha256(self, file: Path) -> str:
        st = file.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        key = f"{st.st_dev}:{st.st_ino}"
        hit = self._entries.get(key)
        if hit and hit[:2] == stamp:
            return hit[2]
        value = sha256_file(file)
        self._entries[key] = stamp + [value]
        self._dirty = True
        return value

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")  # unique: threads save concurrently
        tmp.write_text(json.dumps(self._entries))
        os.replace(tmp, self.path)
        self._dirty = False


class HashAhead:
    """Hash a writer's finished files while it writes the next ones, so a multi-file checkpoint is not read again
    after its writer ends: the commit finds each file's sha256 in ``cache`` (stamped with size and mtime, so a file
    changed after it was hashed is hashed again there).

    Only for writers that create each file matching ``patterns`` under a temporary name and rename it when it is
    complete (safetensors >= 0.8 does, for every shard transformers saves): a file under its final name is whole.
    Used as a context manager around the writer; on exit it stops looking and waits for the hashes under way.
    """

    def __init__(self, root: Path, cache: DigestCache, patterns: Iterable[str], poll_seconds: float = 0.2):
        self.root, self.cache, self.patterns, self.poll_seconds = root, cache, tuple(patterns), poll_seconds
        self.hashed: list[str] = []  # paths relative to root, in the order they were hashed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hash-ahead", daemon=True)

    def __enter__(self) -> "HashAhead":
        if self.patterns:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.patterns:
            return
        self._stop.set()
        self._thread.join()
        self.cache.save()

    def _watch(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        seen: set[Path] = set()
        with ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1), thread_name_prefix="hash-ahead") as pool:
            while not self._stop.wait(self.poll_seconds):
                for path in sorted(p for pattern in self.patterns for p in self.root.rglob(pattern)):
                    if path not in seen and not path.name.startswith("."):
                        seen.add(path)
                        pool.submit(self._hash, path)

    def _hash(self, path: Path) -> None:
        try:
            self.cache.sha256(path)
        except OSError:  # gone again (the writer replaced it): the commit hashes what is there
            return
        self.hashed.append(path.relative_to(self.root).as_posix())
