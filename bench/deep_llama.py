"""A deeper trained Llama for quality benchmarks: the bundled model's recipe (same shipped-corpus generator, same
tokenizer, same seed and optimiser) with more layers, trained here in a few minutes on a CPU.

    python bench/deep_llama.py [LAYERS] [STEPS]     # writes bench/out/deep-llama-<LAYERS>l

Deterministic algorithms and a fixed seed make it reproducible on the same torch build; the benchmark prints the
weights' sha256, so a figure can be tied to the exact checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.bundled.corpus import generate
from quantmill.bundled.make_tiny_llama import train_model

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def make(layers: int = 6, steps: int = 400) -> Path:
    out = HERE / "out" / f"deep-llama-{layers}l"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(2)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bundled = BUNDLED_ROOT / "tiny-llama"
    for name in TOKENIZER_FILES:
        shutil.copy(bundled / name, tmp / name)
    tok = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    train_model(tok, generate(seed=0, n_paragraphs=6000), tmp, layers=layers, steps=steps)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(make(*(int(a) for a in sys.argv[1:3])))
