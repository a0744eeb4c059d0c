"""Reading GGUF files with the gguf-py that ships with the pinned llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bits_per_weight(path: Path) -> float:
    """Stored bits per tensor element over every tensor in the file (llama.cpp's own "bpw" figure)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elements = sum(int(t.n_elements) for t in reader.tensors)
    return 8 * n_bytes / n_elements


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def metadata(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            out[key] = field.contents()
    return out
