"""What the pinned converter will do with a model's tokenizer, found before anything is downloaded or computed.

``convert_hf_to_gguf.py`` takes a byte-level BPE vocabulary (no ``tokenizer.model``, no byte fallback) through
``get_vocab_base``: it asserts that every token id is below ``vocab_size``, and it recognises the pre-tokenizer
only by the sha256 of one fixed text's token ids, from a list written into the converter. A tokenizer outside that
list, or with added tokens past ``vocab_size``, makes the converter fail after download and calibration; here the
same facts are read from the pinned converter's source and the tokenizer files alone.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HASH = re.compile(r'chkhsh == "([0-9a-f]{64})"')
_TEXT = re.compile(r"^\s*chktxt = (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class PreTokenizers:
    text: str  # the text the converter tokenizes
    hashes: frozenset[str]  # the sha256 of the ids of every pre-tokenizer it knows


@functools.lru_cache(maxsize=4)
def known_pre_tokenizers(source: Path) -> PreTokenizers:
    """The pinned converter's check text and hash list (``conversion/base.py``, or the single-file converter)."""
    for path in (source / "conversion" / "base.py", source / "convert_hf_to_gguf.py"):
        if path.is_file() and "chkhsh" in (code := path.read_text(encoding="utf-8")):
            text = _TEXT.search(code)
            if text:
                return PreTokenizers(ast.literal_eval(text.group(1).strip()), frozenset(_HASH.findall(code)))
    raise FileNotFoundError(f"no pre-tokenizer list in llama.cpp's converter under {source}")


def takes_bpe_path(root: Path) -> bool:
    """Whether the converter reads this tokenizer as a byte-level BPE vocabulary (the path with the hash check)."""
    if (root / "tokenizer.model").is_file() or not (root / "tokenizer.json").is_file():
        return False
    model = json.loads((root / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback")


def problems(root: Path, config: dict[str, Any], source: Path) -> list[str]:
    """Why the converter would refuse this tokenizer (empty when it will take it)."""
    if not takes_bpe_path(root):
        return []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root))
    found = []
    vocab = tok.get_vocab()
    size = config.get("vocab_size", len(vocab))
    top = max(vocab.values())
    if top >= size:
        past = sorted(t for t, i in vocab.items() if i >= size)
        found.append(f"token id {top} ({past[0]!r}{' …' if len(past) > 1 else ''}) is past config.json's "
                     f"vocab_size {size}: {len(past)} added token(s) beyond the vocabulary")
    known = known_pre_tokenizers(source)
    digest = hashlib.sha256(str(tok.encode(known.text)).encode()).hexdigest()
    if digest not in known.hashes:
        found.append(f"its BPE pre-tokenizer (hash {digest[:12]}) is not among the {len(known.hashes)} the "
                     f"converter recognises")
    return found
