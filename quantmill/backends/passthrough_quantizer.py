"""``passthrough``: the checkpoint at its original precision, cast to F16 or BF16 and re-sharded.

The "original precision" row of the format tables: no quantization, only a dtype cast (when asked), shards of a
configured size, and the tokenizer and generation config carried over unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import QUANTIZERS
from quantmill.backends.base import QuantizerDefaults, SourceInfo, check_shard_size, check_transformers_loads
from quantmill.config import RecipeConfig
from quantmill.errors import PreflightError
from quantmill.toolchain.model_files import safetensors_bits
from quantmill.toolchain.versions import package_versions

DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
DEFAULT_SHARD = "5GB"


class PassthroughQuantizer(QuantizerDefaults):
    key = "passthrough"
    capability = C.CPU
    formats = ("safetensors",)
    renamed_when_complete = ("*.safetensors",)  # huggingface_hub saves each shard with safetensors' save_file

    def check(self, name: str, recipe: RecipeConfig) -> None:
        if (recipe.quant_type or "").upper() not in DTYPES:
            raise PreflightError(f"recipe {name!r}: quant_type {recipe.quant_type!r} is not a passthrough dtype; "
                                 f"known: {', '.join(DTYPES)}")
        unknown = set(recipe.params) - {"max_shard_size"}
        if unknown:
            raise PreflightError(f"recipe {name!r}: unknown params {sorted(unknown)}; known: max_shard_size")
        check_shard_size(name, recipe.params)

    def check_model(self, name: str, recipe: RecipeConfig, info: SourceInfo) -> None:
        check_transformers_loads(name, info)

    def estimate_bytes(self, recipe: RecipeConfig, f16_bytes: int) -> int:
        return f16_bytes * (2 if recipe.quant_type.upper() == "F32" else 1)

    def tools(self) -> dict[str, str]:
        return package_versions("torch", "safetensors", "huggingface_hub")

    def quantize(self, model: Path, out: Path, config: Mapping[str, Any], *, imatrix: Path | None, threads: int,
                 label: str) -> dict[str, Any]:
        import torch
        from huggingface_hub import save_torch_state_dict
        from safetensors.torch import load_file

        dtype = getattr(torch, DTYPES[config["quant_type"]])
        state: dict[str, Any] = {}
        for shard in sorted(model.glob("*.safetensors")):
            for name, tensor in load_file(shard).items():
                state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        save_torch_state_dict(state, out, max_shard_size=config["params"].get("max_shard_size", DEFAULT_SHARD))
        for f in sorted(model.iterdir()):  # tokenizer, generation config, chat template: carried over unchanged
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "model.safetensors.index.json", "README.md", C.RESULT_FILE):
                shutil.copy(f, out / f.name)
        config_json = json.loads((out / "config.json").read_text())
        config_json["torch_dtype"] = DTYPES[config["quant_type"]]
        config_json.pop("dtype", None)
        (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        return {"quant_type": config["quant_type"], "bits_per_weight": round(safetensors_bits(out), 4),
                "shards": len(list(out.glob("*.safetensors")))}


QUANTIZERS.register(PassthroughQuantizer.key)(PassthroughQuantizer())
