"""convert: a Hugging Face model directory to a format's unquantized intermediate (F16 GGUF, MLX)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def convert(converter: Any, model_dir: Path, out: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Write the intermediate into ``out`` with ``converter`` (a CONVERTERS backend); return its result."""
    return converter.convert(model_dir, out, config)
