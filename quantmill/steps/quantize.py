"""quantize: the intermediate to the recipe's quantized artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quantize(quantizer: Any, model: Path, out: Path, *, quant_type: str, imatrix: Path | None, threads: int,
             label: str) -> dict[str, Any]:
    return quantizer.quantize(model, out, quant_type=quant_type, imatrix=imatrix, threads=threads, label=label)
