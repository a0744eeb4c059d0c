"""Run every CPU benchmark and print its table: ``make bench`` (or ``python bench/run.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf_pipeline  # noqa: E402

if __name__ == "__main__":
    print(gguf_pipeline.markdown(gguf_pipeline.main()))
