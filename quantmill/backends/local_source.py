"""Model sources that are directories on this machine: ``local`` (any path) and ``bundled`` (shipped models)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from quantmill.backends import SOURCES
from quantmill.backends.base import SourceInfo
from quantmill.config import ModelConfig
from quantmill.digest import DigestCache, digest_tree, manifest_digest
from quantmill.errors import ModelSourceError
from quantmill.toolchain.model_files import (
    check_config,
    check_model_files,
    check_safetensors,
    read_config,
    select_files,
)

BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "bundled"


def link_or_copy(src: Path, dst: Path, on_bytes: Callable[[int], None] | None = None, *, link: bool) -> None:
    """Hardlink ``src`` to ``dst`` when allowed and on the same filesystem, else copy it.

    A hardlink costs no time or space, and is safe here because the store re-checks every file against its
    recorded digest before a step reads it, so an in-place edit of the source is caught, never used.
    """
    if link:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
            if on_bytes:
                on_bytes(src.stat().st_size)
            return
        except OSError:
            pass  # another filesystem, or links not supported: copy
    copy_file(src, dst, on_bytes)


def copy_file(src: Path, dst: Path, on_bytes: Callable[[int], None] | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(16 << 20):
            fo.write(chunk)
            if on_bytes:
                on_bytes(len(chunk))


class LocalSource:
    """A Hugging Face-layout model directory on this machine, identified by the digest of its files."""

    key = "local"

    def root(self, cfg: ModelConfig) -> Path:
        if not cfg.path:
            raise ModelSourceError(f"model {cfg.name!r}: source {self.key!r} needs model.path")
        return Path(cfg.path).expanduser().resolve()

    def read_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json alone: what size estimates need, before any weights are looked at."""
        return read_config(self.root(cfg) / "config.json", cfg.name)

    def describe(self, cfg: ModelConfig, cache: DigestCache) -> SourceInfo:
        root = self.root(cfg)
        if root.is_file():
            raise ModelSourceError(f"model {cfg.name!r}: model.path {root} is a file; point model.path at the "
                                   f"directory that holds config.json and the weights ({root.parent}?)")
        if not root.is_dir():
            raise ModelSourceError(f"model {cfg.name!r}: directory {root} does not exist; fix model.path")
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                 and not p.relative_to(root).as_posix().startswith(".")]
        chosen = select_files(cfg.name, names, allow_pickle=cfg.allow_pickle,
                              trust_remote_code=cfg.trust_remote_code)
        config = read_config(root / "config.json", cfg.name)
        arch = check_config(cfg.name, config, trust_remote_code=cfg.trust_remote_code)
        for name in chosen:
            if name.endswith(".safetensors"):
                check_safetensors(root / name)
        check_model_files(root, chosen, config, cfg.name)
        files = digest_tree(root, [root / n for n in chosen], hasher=cache.sha256)
        cache.save()
        return SourceInfo(source=self.key, identity={"content": manifest_digest(files)}, config=config,
                          architecture=arch, files=files, uri=root.as_uri(), base_model=cfg.name,
                          license=config.get("license"), extra={"root": str(root)})

    def download(self, cfg: ModelConfig, info: SourceInfo, out: Path,
                 on_bytes: Callable[[int], None] | None = None, *, link: bool = False) -> None:
        root = Path(info.extra["root"])
        for f in info.files:
            link_or_copy(root / f.path, out / f.path, on_bytes, link=link)

    def dependency(self, info: SourceInfo) -> dict[str, Any]:
        return {"name": "model", "uri": info.uri, "digest": {"sha256": info.identity["content"].split(":")[1]}}


class BundledSource(LocalSource):
    """Models shipped inside the quantmill package (``model.path`` is the model's folder name)."""

    key = "bundled"

    def root(self, cfg: ModelConfig) -> Path:
        path = BUNDLED_ROOT / (cfg.path or "")
        if not cfg.path or not (path / "config.json").is_file():
            known = sorted(p.parent.name for p in BUNDLED_ROOT.glob("*/config.json"))
            raise ModelSourceError(f"unknown bundled model {cfg.path!r}; known: {', '.join(known)}")
        return path


SOURCES.register(LocalSource.key)(LocalSource())
SOURCES.register(BundledSource.key)(BundledSource())
