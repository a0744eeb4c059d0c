"""Reading GGUF files with the gguf-py that ships with the pinned llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


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


def weight_types(path: Path) -> dict[str, int]:
    """ggml type name -> parameters stored in it, over the weight matrices (tensors of two or more dimensions)."""
    from gguf import GGUFReader

    census: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        if len([d for d in t.shape if int(d) > 1]) >= 2:
            census[t.tensor_type.name] = census.get(t.tensor_type.name, 0) + int(t.n_elements)
    return census


# Types llama.cpp falls back to when a k-quant's 256-wide blocks do not divide a row.
LEGACY_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16", "F32"})


def fallback(requested: str, census: dict[str, int]) -> dict[str, Any] | None:
    """How much of a k-quant request llama.cpp stored in other types (None when nothing fell back): the share of
    weight parameters, the real mix, and a label naming what dominates."""
    if "_K" not in requested.upper() or not census:
        return None
    total = sum(census.values())
    fell = sum(n for kind, n in census.items() if kind in LEGACY_TYPES)
    if not fell:
        return None
    dominant = max(census, key=census.get)
    return {"fallback_share": round(fell / total, 4),
            "tensor_types": {kind: round(n / total, 4) for kind, n in sorted(census.items(), key=lambda kv: -kv[1])},
            "quant_type": f"{dominant} mix", "quant_type_requested": requested.upper()}


def metadata(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            out[key] = field.contents()
    return out


def offloaded_bytes(path: Path, gpu_layers: Sequence[int]) -> list[int]:
    """Bytes of weights llama.cpp places on the GPU at each count of ``gpu_layers`` (``-ngl``): that many of the
    repeating blocks (the last ones), and the output head once the count passes the block count; the token
    embeddings stay on the CPU. Blocks need not weigh the same (a k-quant mix gives some layers more bits). The
    tensor table is read once for all the counts."""
    from gguf import GGUFReader

    blocks: dict[int, int] = {}
    output = 0
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            blocks[i] = blocks.get(i, 0) + int(t.n_bytes)
        elif t.name.startswith("output"):
            output += int(t.n_bytes)
    n = len(blocks)
    return [sum(b for i, b in blocks.items() if i >= n - min(layers, n)) + (output if layers > n else 0)
            for layers in gpu_layers]
