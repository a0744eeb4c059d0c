"""merge: fold a LoRA adapter into its base model, producing a plain checkpoint every recipe can start from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

_KEEP = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json", "chat_template.jinja", "generation_config.json")


def merge(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    """Merge in float32 (W + scale * B @ A without half-precision rounding), then save in the base's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((base / "config.json").read_text())
    dtype_name = config.get("torch_dtype") or config.get("dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(getattr(torch, dtype_name)).save_pretrained(out, safe_serialization=True)
    for name in _KEEP:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy(base / name, out / name)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    return {"dtype": dtype_name, "rank": adapter_config.get("r"), "alpha": adapter_config.get("lora_alpha"),
            "target_modules": sorted(adapter_config.get("target_modules") or [])}
