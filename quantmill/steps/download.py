"""download: take a model's files from its source into the output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from quantmill.backends.base import SourceInfo
from quantmill.config import ModelConfig
from quantmill.digest import sha256_file
from quantmill.errors import ModelSourceError
from quantmill.progress import reporter
from quantmill.toolchain.model_files import nonfinite_tensors


def download(source: Any, cfg: ModelConfig, info: SourceInfo, out: Path, *, link: bool = False,
             hasher: Callable[[Path], str] = sha256_file) -> dict[str, Any]:
    """Fetch ``info.files`` into ``out`` and check each against the digest preflight saw (where known).

    ``link`` lets the source hardlink files that are already on this filesystem (a local directory, the HF
    cache) instead of copying them.

    Raises:
        ModelSourceError: a file changed between preflight and download, or is missing.
    """
    total = sum(f.size for f in info.files)
    bar = reporter().bar(f"download {cfg.name}", total=total, unit="B")
    try:
        source.download(cfg, info, out, on_bytes=bar.advance, link=link)
    finally:
        bar.close()
    for f in info.files:
        if f.sha256 and (actual := hasher(out / f.path)) != f.sha256:
            raise ModelSourceError(f"model {cfg.name!r}: {f.path} changed since it was planned (sha256 "
                                   f"{actual[:12]} != {f.sha256[:12]}); re-run to pick up the new content")
    for f in info.files:  # weights that are not numbers make every tool downstream fail far from the cause
        if f.path.endswith(".safetensors") and (bad := nonfinite_tensors(out / f.path)):
            name, count = bad[0]
            more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
            raise ModelSourceError(f"model {cfg.name!r}: tensor {name!r} in {f.path} holds {count} NaN or infinite "
                                   f"value(s){more}; the checkpoint is broken: re-export it from a good copy")
    # No paths or URIs here: they differ between machines, and these bytes must not (the URI is in provenance).
    return {"files": [f.path for f in info.files], "architecture": info.architecture}
