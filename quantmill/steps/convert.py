"""convert: a Hugging Face model directory to the format's intermediate (an F16 GGUF for GGUF recipes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def convert(converter: Any, model_dir: Path, out: Path, *, outtype: str, model_name: str) -> dict[str, Any]:
    return converter.convert(model_dir, out, outtype=outtype, model_name=model_name)
