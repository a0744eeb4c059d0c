"""Which files of a model directory quantmill takes, and the checks it makes on them before heavy work."""

from __future__ import annotations

import fnmatch
import json
import struct
from pathlib import Path
from typing import Any, Iterable

from quantmill.errors import ModelSourceError, PreflightError

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SAFE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "LICENSE", "LICENSE.txt", "README.md",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")
CODE_PATTERNS = ("*.py",)


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def select_files(model: str, names: Iterable[str], *, allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    """The files to take from a model repo or directory, enforcing the pickle and remote-code policies."""
    names = sorted(set(names))
    chosen = [n for n in names if _match(n, SAFE_PATTERNS)]
    if CONFIG_FILE not in names:
        raise ModelSourceError(f"model {model!r} has no {CONFIG_FILE}; point model.path / model.repo_id at a "
                               f"Hugging Face model directory")
    if not any(n in names for n in TOKENIZER_FILES):
        raise ModelSourceError(f"model {model!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the "
                               f"tokenizer files from the base model into it")
    pickles = [n for n in names if _match(n, PICKLE_PATTERNS)]
    if not any(n.endswith(".safetensors") for n in names):
        if not pickles:
            raise ModelSourceError(f"model {model!r} has no weights (*.safetensors)")
        if not allow_pickle:
            raise ModelSourceError(
                f"model {model!r} ships only pickle weights ({', '.join(pickles[:3])}); loading pickle can run "
                f"arbitrary code: set model.allow_pickle=true if you trust it, or convert it to safetensors")
        chosen += pickles
    if trust_remote_code:
        chosen += [n for n in names if _match(n, CODE_PATTERNS)]
    return sorted(set(chosen))


def check_config(model: str, config: dict[str, Any], *, trust_remote_code: bool) -> str:
    """Check config.json; return the architecture (``architectures[0]``)."""
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        first = next(iter(auto_map.items()))
        raise PreflightError(
            f"model {model!r} declares custom code (auto_map: {first[0]} -> {first[1]}); it would run that code: "
            f"set model.trust_remote_code=true if you trust it")
    archs = config.get("architectures") or []
    if not archs:
        raise PreflightError(f"model {model!r}: config.json has no 'architectures'; add e.g. "
                             f"\"architectures\": [\"LlamaForCausalLM\"]")
    return archs[0]


# Model types whose config.json must carry the shape keys every converter and runtime reads.
SHAPED_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                          "gemma3_text", "phi3", "granite", "olmo2"})
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_model_files(root: Path, chosen: Iterable[str], config: dict[str, Any], model: str) -> None:
    """What a converter would only find deep into its run: config.json's shape keys, the embedding's rows against
    ``vocab_size``, a tokenizer.json that does not parse. Reads headers and small files only."""
    if config.get("model_type") in SHAPED_TYPES:
        missing = [k for k in SHAPE_KEYS if not isinstance(config.get(k), int)]
        if missing:
            raise PreflightError(f"model {model!r}: config.json has no {missing[0]!r} (a {config['model_type']} "
                                 f"config needs {', '.join(SHAPE_KEYS)}); fix config.json")
    chosen = list(chosen)
    if "tokenizer.json" in chosen:
        try:
            json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelSourceError(f"model {model!r}: tokenizer.json is not valid JSON ({str(e).splitlines()[0]}); "
                                   f"the file is damaged: copy or download it again") from None
    vocab = config.get("vocab_size")
    for path in (root / n for n in chosen if n.endswith(".safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name.endswith(("embed_tokens.weight", "tok_embeddings.weight", "wte.weight")) and isinstance(vocab, int) \
                    and t["shape"] and t["shape"][0] != vocab:
                raise PreflightError(f"model {model!r}: embedding {name} has {t['shape'][0]} rows but config.json "
                                     f"says vocab_size {vocab}; fix vocab_size or the checkpoint")


def read_config(path: Path, model: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelSourceError(f"model {model!r} has no {CONFIG_FILE} at {path}") from None
    except ValueError as e:
        raise ModelSourceError(f"model {model!r}: {path} is not valid JSON ({e})") from None


def check_safetensors(path: Path) -> int:
    """Check a safetensors file's header against its size; return the number of weight bytes.

    A truncated or padded file is caught here, reading only the header, before any tool loads it.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelSourceError(f"{path.name}: {size} bytes is too short for a safetensors file; "
                                   f"download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ModelSourceError(f"{path.name}: header length {n} exceeds the file ({size} bytes); the file "
                                   f"is truncated or not safetensors; download it again")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelSourceError(f"{path.name}: unreadable safetensors header; download it again") from None
    for name, t in header.items():
        if name == "__metadata__" or t.get("dtype") not in _DTYPE_BITS:
            continue
        elements = 1
        for d in t["shape"]:
            elements *= d
        span = t["data_offsets"][1] - t["data_offsets"][0]
        if span != elements * _DTYPE_BITS[t["dtype"]] // 8:
            raise ModelSourceError(f"{path.name}: tensor {name!r} declares shape {t['shape']} of {t['dtype']} "
                                   f"({elements * _DTYPE_BITS[t['dtype']] // 8} bytes) but spans {span} bytes; the "
                                   f"file is corrupt; download it again")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + n + end
    if size != expected:
        diff = expected - size
        what = f"{diff} byte{'s' if diff != 1 else ''} shorter" if diff > 0 else f"{-diff} bytes longer"
        raise ModelSourceError(f"{path.name} is {what} than its header declares ({size} bytes, expected "
                               f"{expected}); the file is corrupt or truncated; download it again")
    return end


_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "F8_E4M3": 8, "F8_E5M2": 8, "BOOL": 8}


def safetensors_tensors(directory: Path):
    """(name, dtype, number of elements, bytes) of every tensor in a directory's safetensors files, from headers."""
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            elements = 1
            for d in t["shape"]:
                elements *= d
            yield name, t["dtype"], elements, t["data_offsets"][1] - t["data_offsets"][0]


def safetensors_bits(directory: Path) -> float:
    """Stored bits per element over all tensors of a directory's safetensors files (headers only)."""
    tensors = list(safetensors_tensors(directory))
    total_elements = sum(t[2] for t in tensors)
    return 8 * sum(t[3] for t in tensors) / total_elements if total_elements else 0.0


# The exponent bits of each float type: all set means an infinity or a NaN.
_EXPONENT = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
             "F64": ("<u8", 0x7FF0000000000000)}
_CHUNK_ELEMENTS = 16 << 20


def nonfinite_tensors(path: Path) -> list[tuple[str, int]]:
    """(tensor, count) of every floating-point tensor in a safetensors file that holds NaN or infinity, read in
    chunks from a memory map (the weights are not loaded as arrays)."""
    import numpy as np

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if path.stat().st_size > 8 + n else None
    found = []
    for name, t in header.items():
        if name == "__metadata__" or t.get("dtype") not in _EXPONENT or data is None:
            continue
        kind, mask = _EXPONENT[t["dtype"]]
        start, end = t["data_offsets"]
        values = data[start:end].view(kind)
        bad = 0
        for i in range(0, values.size, _CHUNK_ELEMENTS):
            chunk = values[i:i + _CHUNK_ELEMENTS]
            bad += int(np.count_nonzero((chunk & mask) == mask))
        if bad:
            found.append((name, bad))
    return found


def transformers_knows(model_type: str) -> bool:
    """Whether the installed transformers has code for ``model_type`` (read from its package folders, without
    importing it: that costs seconds). A type living in a family's folder (``gemma3_text`` in ``gemma3``) counts."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to judge by; the loader will say
    folders = {p.name for p in (Path(spec.submodule_search_locations[0]) / "models").iterdir() if p.is_dir()}
    name = model_type.replace("-", "_")
    return name in folders or any(name.startswith(f + "_") for f in folders)
