"""quantize: an intermediate (or the source checkpoint) to a recipe's artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def quantize(quantizer: Any, model: Path, out: Path, config: Mapping[str, Any], *, imatrix: Path | None,
             threads: int, label: str, **inputs: Path) -> dict[str, Any]:
    """Write the recipe's artifact into ``out`` with ``quantizer`` (a QUANTIZERS backend); return its result.

    ``inputs`` are further inputs the quantizer declared (``calibration``: the tokenized calibration set)."""
    return quantizer.quantize(model, out, config, imatrix=imatrix, threads=threads, label=label, **inputs)
