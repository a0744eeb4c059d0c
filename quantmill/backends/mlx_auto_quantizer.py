"""MLX mixed precision toward a budget: mlx-lm's per-layer quantization predicate, driven by the same measured
sensitivity as ``gguf_auto``.

Each linear layer's cost at 2, 3, 4, 6 and 8 bits is its measured cost at the llama.cpp type of that width (Q2_K,
Q3_K, Q4_K, Q6_K, Q8_0): the quantizers differ (MLX is round-to-nearest with a scale and bias per group), but
which layers suffer most from fewer bits is a property of the model, and that order is what the search needs. Sizes
are MLX's own: bits per weight plus 32 bits of scale and bias per group.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import QUANTIZERS
from quantmill.backends.gguf_auto_quantizer import budget_bytes, budget_label, check_budget, choose_mix, predicted_kld
from quantmill.backends.mlx_converter import mlx_convert
from quantmill.backends.mlx_quantizer import GROUP_SIZES, MlxQuantizer, logical_bits
from quantmill.errors import PreflightError

MLX_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q6_K": 6, "Q8_0": 8}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def gguf_name(path: str) -> str | None:
    """mlx-lm's module path -> the tensor llama.cpp's converter names (Llama-style models); None if unknown."""
    if path == "model.embed_tokens":
        return "token_embd.weight"
    if path == "lm_head":
        return "output.weight"
    m = _LAYER.match(path)
    if m and m.group(2) in _GGUF_OF:
        return f"blk.{m.group(1)}.{_GGUF_OF[m.group(2)]}.weight"
    return None


def mlx_sensitivity(data: Mapping[str, Any], group_size: int) -> dict[str, Any]:
    """The GGUF sensitivity re-sized for MLX: the types with an MLX width, MLX's bytes at each; norms in float16."""
    types = [t for t in data["types"] if t in MLX_BITS]
    if not types:
        raise PreflightError(f"calibration.sensitivity.types {data['types']} has none of {', '.join(MLX_BITS)}, the "
                             f"widths MLX quantizes to; add them for mlx_auto")
    tensors = {n: {"kld": {t: d["kld"][t] for t in types},
                   "bytes": {t: int(d["elements"] * (MLX_BITS[t] + 32 / group_size) / 8) for t in types}}
               for n, d in data["tensors"].items()}
    quantized = sum(d["elements"] for d in data["tensors"].values())
    return {"types": types, "tensors": tensors, "total_elements": data["total_elements"],
            "fixed_bytes": 2 * (data["total_elements"] - quantized)}


class MlxAutoQuantizer(MlxQuantizer):
    """Source checkpoint -> MLX with a bit width per layer chosen for ``budget_bpw``."""

    key = "mlx_auto"
    uses_sensitivity = True
    calibration_input = "sensitivity"

    def check(self, name: str, recipe: Any) -> None:
        check_budget(name, recipe, "mlx_auto", extra=("group_size",))
        if recipe.params.get("group_size", 64) not in GROUP_SIZES:
            raise PreflightError(f"recipe {name!r}: group_size {recipe.params['group_size']} unsupported by mlx; "
                                 f"choose one of {GROUP_SIZES}")

    def needs_calibration(self, recipe: Any) -> bool:
        return True

    def estimate_bytes(self, recipe: Any, f16_bytes: int) -> int:
        return QUANTIZERS.get("gguf_auto").estimate_bytes(recipe, f16_bytes)

    def quantize(self, model: Path, out: Path, config: Mapping[str, Any], *, imatrix: Path | None, threads: int,
                 label: str, sensitivity: Path | None = None, **_: Path) -> dict[str, Any]:
        if sensitivity is None:
            raise PreflightError(f"{label}: mlx_auto needs the sensitivity artifact as an input")
        group = config["params"].get("group_size", 64)
        measured = json.loads((sensitivity / C.SENSITIVITY_FILE).read_text())
        data = mlx_sensitivity(measured, group)
        allowed = budget_bytes(config["params"], {**data, "header_bytes": 0})
        budget = 8 * allowed / data["total_elements"]
        mix = choose_mix(data, allowed)
        elements: dict[int, int] = {}  # weights stored at each width
        for n, t in mix.items():
            elements[MLX_BITS[t]] = elements.get(MLX_BITS[t], 0) + measured["tensors"][n]["elements"]
        default = max(elements, key=elements.get)
        unmapped: list[str] = []

        def predicate(path: str, module: Any) -> bool | dict[str, Any]:
            name = gguf_name(path)
            if name not in mix:  # a layer the sensitivity does not name: the mix's most common width
                unmapped.append(path)
                return {"bits": default, "group_size": group}
            return {"bits": MLX_BITS[mix[name]], "group_size": group}

        mlx_convert(model, out, quantize=True, q_bits=default, q_group_size=group, quant_predicate=predicate)
        total = sum(elements.values())
        return {"quant_type": f"AUTO-{budget:.2f}", "group_size": group, "budget_bpw": round(budget, 4),
                "budget": budget_label(config["params"]),
                "bits_per_weight": round(logical_bits(out), 4),
                "mix": {n: MLX_BITS[t] for n, t in sorted(mix.items())},
                "tensor_types": {f"{b}-bit": round(n / total, 4) for b, n in sorted(elements.items(), key=lambda kv: -kv[1])},
                "predicted_kld": predicted_kld(data, mix),
                "sensitivity_method": f"{measured['method']} (in llama.cpp, by width)", "unmapped_layers": unmapped}


QUANTIZERS.register(MlxAutoQuantizer.key)(MlxAutoQuantizer())
