"""MLX quantization with mlx-lm: 2, 3, 4, 6 and 8 bit, group sizes 32/64/128, and mlx-lm's mixed recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import QUANTIZERS
from quantmill.backends.base import QuantizerDefaults
from quantmill.backends.mlx_converter import mlx_convert
from quantmill.config import RecipeConfig
from quantmill.errors import PreflightError
from quantmill.toolchain.model_files import safetensors_tensors
from quantmill.toolchain.versions import package_versions

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
MIXED = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")


def parse_quant_type(quant_type: str) -> tuple[int | None, str | None]:
    """``Q4`` -> (4, None); ``MIXED_3_6`` -> (None, "mixed_3_6")."""
    q = quant_type.lower()
    if q in MIXED:
        return None, q
    if q.startswith("q") and q[1:].isdigit() and int(q[1:]) in BITS:
        return int(q[1:]), None
    raise ValueError(quant_type)


def logical_bits(artifact: Path) -> float:
    """Stored bits per model parameter: packed uint32 weights count as 32/bits parameters per element; scales and
    biases are overhead, not parameters."""
    config = json.loads((artifact / "config.json").read_text())
    quant = config.get("quantization") or {}
    total_bytes = params = 0
    for name, dtype, elements, size in safetensors_tensors(artifact):
        total_bytes += size
        if name.endswith((".scales", ".biases")):
            continue
        if dtype == "U32":
            layer = quant.get(name.removesuffix(".weight"), quant)
            elements = elements * 32 // layer.get("bits", quant.get("bits", 4))
        params += elements
    return 8 * total_bytes / params if params else 0.0


class MlxQuantizer(QuantizerDefaults):
    key = "mlx"
    capability = C.MLX
    formats = ("mlx",)

    def check(self, name: str, recipe: RecipeConfig) -> None:
        try:
            parse_quant_type(recipe.quant_type or "")
        except ValueError:
            raise PreflightError(f"recipe {name!r}: quant_type {recipe.quant_type!r} unknown to mlx; known: "
                                 f"{', '.join(f'Q{b}' for b in BITS)}, {', '.join(m.upper() for m in MIXED)}") from None
        group = recipe.params.get("group_size", 64)
        if group not in GROUP_SIZES:
            raise PreflightError(f"recipe {name!r}: group_size {group} unsupported by mlx; choose one of {GROUP_SIZES}")
        unknown = set(recipe.params) - {"group_size"}
        if unknown:
            raise PreflightError(f"recipe {name!r}: unknown params {sorted(unknown)}; known: group_size")

    def estimate_bytes(self, recipe: RecipeConfig, f16_bytes: int) -> int:
        bits, mixed = parse_quant_type(recipe.quant_type)
        bits = bits or int(mixed.split("_")[2])
        return int(f16_bytes * (bits + 0.5) / 16)

    def tools(self) -> dict[str, str]:
        return package_versions("mlx", "mlx-lm", "transformers")

    def quantize(self, model: Path, out: Path, config: Mapping[str, Any], *, imatrix: Path | None, threads: int,
                 label: str) -> dict[str, Any]:
        bits, mixed = parse_quant_type(config["quant_type"])
        group = config["params"].get("group_size", 64)
        mlx_convert(model, out, quantize=True, q_bits=bits, q_group_size=group, quant_predicate=mixed)
        return {"quant_type": config["quant_type"], "group_size": group,
                "bits_per_weight": round(logical_bits(out), 4)}


QUANTIZERS.register(MlxQuantizer.key)(MlxQuantizer())
