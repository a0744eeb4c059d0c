"""PEFT adapters to merge into a base model: where they come from, and whether they belong to the base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantmill.backends.base import SourceInfo
from quantmill.config import ModelConfig
from quantmill.digest import DigestCache, FileDigest, manifest_digest
from quantmill.errors import ModelSourceError, PreflightError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def describe(model: ModelConfig, cache: DigestCache | None) -> SourceInfo:
    """The adapter's files and identity (content digest of a local directory, or a Hub commit sha)."""
    path = Path(model.adapter).expanduser()
    if path.is_dir():
        missing = [n for n in ADAPTER_FILES if not (path / n).is_file()]
        if missing:
            raise ModelSourceError(f"adapter {model.adapter!r} has no {', '.join(missing)}; a PEFT adapter directory "
                                   f"holds adapter_config.json and adapter_model.safetensors (pickle adapters refused)")
        hasher = cache.sha256 if cache else None
        from quantmill.digest import sha256_file

        files = [FileDigest(n, (hasher or sha256_file)(path / n), (path / n).stat().st_size) for n in ADAPTER_FILES]
        if cache:
            cache.save()
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        return SourceInfo(source="local", identity={"content": manifest_digest(files)}, config=config,
                          architecture=config.get("peft_type", "?"), files=files, uri=path.resolve().as_uri(),
                          base_model=model.adapter, extra={"root": str(path.resolve())})
    from huggingface_hub import hf_hub_download

    try:
        config_path = Path(hf_hub_download(model.adapter, ADAPTER_CONFIG, revision=model.adapter_revision))
    except Exception as e:  # not a directory here, and not resolvable on the Hub: say both
        raise ModelSourceError(f"adapter {model.adapter!r} is neither a local directory nor a reachable Hub repo "
                               f"({type(e).__name__}); fix model.adapter") from None
    sha = config_path.parent.name
    config = json.loads(config_path.read_text())
    files = [FileDigest(n, "", 0) for n in ADAPTER_FILES]
    return SourceInfo(source="hf", identity={"repo_id": model.adapter, "commit": sha}, config=config,
                      architecture=config.get("peft_type", "?"), files=files, uri=f"hf://{model.adapter}@{sha}",
                      base_model=model.adapter, extra={"commit": sha, "root": str(config_path.parent)})


def _names(model: ModelConfig) -> set[str]:
    names = {model.name}
    if model.repo_id:
        names.add(model.repo_id)
    if model.path:
        names.add(Path(model.path).name)
    return names


def check_base(model: ModelConfig, adapter: SourceInfo) -> None:
    """Refuse an adapter trained on another base (compared by hub id, or by directory or model name)."""
    if adapter.config.get("peft_type") != "LORA":
        raise PreflightError(f"adapter {model.adapter!r} is {adapter.config.get('peft_type')!r}; only LoRA adapters "
                             f"are merged")
    base = adapter.config.get("base_model_name_or_path") or ""
    if base not in _names(model) and Path(base).name not in _names(model):
        configured = model.repo_id or model.path or model.name
        raise PreflightError(f"adapter {model.adapter!r} was trained on base {base!r}, but the configured base model "
                             f"is {configured!r}; point model.* at {base!r} or use an adapter of {configured!r}")


def dependency(info: SourceInfo) -> dict[str, Any]:
    if "commit" in info.identity:
        return {"name": "adapter", "uri": info.uri, "digest": {"gitCommit": info.identity["commit"]}}
    return {"name": "adapter", "uri": info.uri, "digest": {"sha256": info.identity["content"].split(":")[1]}}
