"""Models on the Hugging Face Hub (or a mirror via HF_ENDPOINT, or offline from a populated HF cache).

The revision is resolved to a commit sha before anything is keyed, so "main" moving upstream is a new model and
the same sha is always the same bytes. Only the files quantmill needs are fetched (safetensors, config,
tokenizer); preflight fetches config.json alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from quantmill.backends import SOURCES
from quantmill.backends.base import SourceInfo
from quantmill.backends.local_source import link_or_copy
from quantmill.config import ModelConfig
from quantmill.digest import DigestCache, FileDigest
from quantmill.errors import ModelSourceError
from quantmill.toolchain.model_files import check_config, check_safetensors, read_config, select_files


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class HfSource:
    key = "hf"

    def read_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json alone (one small file from the Hub or the HF cache)."""
        return read_config(self._config_json(cfg), cfg.name)

    def _config_json(self, cfg: ModelConfig) -> Path:
        """The repo's config.json, downloaded or from the HF cache; each way it fails is one line."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if not cfg.repo_id:
            raise ModelSourceError(f"model {cfg.name!r}: source 'hf' needs model.repo_id")
        try:
            return Path(hf_hub_download(cfg.repo_id, "config.json", revision=cfg.revision))
        except LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass
            raise ModelSourceError(f"model repo {cfg.repo_id!r}@{cfg.revision} is not in the local HF cache and "
                                   f"the Hub cannot be reached; run once with network or set HF_ENDPOINT to a "
                                   f"mirror") from None
        except RepositoryNotFoundError:
            raise ModelSourceError(f"model repo {cfg.repo_id!r} not found on the Hub (or it is private: set "
                                   f"HF_TOKEN in the environment)") from None
        except RevisionNotFoundError:
            raise ModelSourceError(f"model repo {cfg.repo_id!r} has no revision {cfg.revision!r}") from None
        except EntryNotFoundError:
            raise ModelSourceError(f"model repo {cfg.repo_id!r}@{cfg.revision} has no config.json") from None

    def describe(self, cfg: ModelConfig, cache: DigestCache) -> SourceInfo:
        from huggingface_hub import HfApi, hf_hub_download

        config_path = self._config_json(cfg)
        sha = config_path.parent.name  # .../snapshots/<commit sha>/config.json
        config = read_config(config_path, cfg.name)
        arch = check_config(cfg.name, config, trust_remote_code=cfg.trust_remote_code)

        sizes: dict[str, tuple[int, str]] = {}
        if not _offline():
            try:
                info = HfApi().model_info(cfg.repo_id, revision=sha, files_metadata=True)
                for s in info.siblings or []:
                    sha256 = s.lfs.sha256 if s.lfs else ""
                    sizes[s.rfilename] = (s.size or 0, sha256)
            except Exception as e:  # the Hub answered config.json but not the listing: say so, do not guess
                raise ModelSourceError(f"model repo {cfg.repo_id!r}: cannot list files at {sha[:12]} "
                                       f"({type(e).__name__}: {e}); retry, or set HF_HUB_OFFLINE=1 to use the "
                                       f"local cache") from e
        else:
            snapshot = config_path.parent
            for p in snapshot.rglob("*"):
                if p.is_file():
                    sizes[p.relative_to(snapshot).as_posix()] = (p.stat().st_size, "")
        chosen = select_files(cfg.name, sizes, allow_pickle=cfg.allow_pickle,
                              trust_remote_code=cfg.trust_remote_code)
        files = [FileDigest(n, sizes[n][1], sizes[n][0]) for n in chosen]
        # small: preflight checks the evaluation text and what the converters will do with the tokenizer
        for name in TOKENIZER_FILES:
            if name in sizes:
                hf_hub_download(cfg.repo_id, name, revision=sha)
        card = config.get("license")
        return SourceInfo(source=self.key, identity={"repo_id": cfg.repo_id, "commit": sha}, config=config,
                          architecture=arch, files=files, uri=f"hf://{cfg.repo_id}@{sha}",
                          base_model=cfg.repo_id, license=card,
                          extra={"commit": sha, "root": str(config_path.parent)})

    def download(self, cfg: ModelConfig, info: SourceInfo, out: Path,
                 on_bytes: Callable[[int], None] | None = None, *, link: bool = False) -> None:
        from huggingface_hub import hf_hub_download

        sha = info.identity["commit"]
        for f in info.files:  # exactly the files preflight chose, each pinned to the commit
            src = Path(hf_hub_download(cfg.repo_id, f.path, revision=sha))
            link_or_copy(src.resolve(), out / f.path, on_bytes, link=link)
            if f.path.endswith(".safetensors"):
                check_safetensors(out / f.path)

    def dependency(self, info: SourceInfo) -> dict[str, Any]:
        return {"name": "model", "uri": info.uri, "digest": {"gitCommit": info.identity["commit"]}}


SOURCES.register(HfSource.key)(HfSource())
