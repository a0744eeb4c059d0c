"""``bitsandbytes``: NF4 / FP4 / INT8 weights quantized at load time and serialized with transformers.

Data-free (no calibration). The output loads with ``from_pretrained`` wherever bitsandbytes runs (CUDA, and
CPU for 4-bit since bitsandbytes 0.47).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.backends import QUANTIZERS
from quantmill.backends.calibrated import CalibratedQuantizer
from quantmill.backends.quantizer_process import write_probe

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


class BitsAndBytesQuantizer(CalibratedQuantizer):
    key = "bitsandbytes"
    formats = ("bnb",)
    schemes = {"bnb": ("NF4", "FP4", "INT8")}
    params = ("double_quant", "compute_dtype", "ignore")
    module = __name__
    packages = ("bitsandbytes", "torch", "transformers")
    renamed_when_complete = ("*.safetensors",)  # transformers saves each shard with safetensors' save_file

    def check(self, name, recipe) -> None:
        super().check(name, recipe)
        from quantmill.errors import PreflightError

        dtype = recipe.params.get("compute_dtype", "bfloat16")
        if dtype not in COMPUTE_DTYPES:
            raise PreflightError(f"recipe {name!r}: compute_dtype {dtype!r} unknown; valid: {', '.join(COMPUTE_DTYPES)}")


QUANTIZERS.register(BitsAndBytesQuantizer.key)(BitsAndBytesQuantizer())


def preload() -> None:
    """What ``run`` imports, imported by a child started ahead of its step."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401


def run(request: dict[str, Any], model_dir: Path, ids: list[list[int]], out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config, params = request["config"], request["config"]["params"]
    scheme = config["quant_type"]
    skip = list(params.get("ignore", ["lm_head"]))
    if scheme == "INT8":
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme.lower(),
                                   bnb_4bit_use_double_quant=params.get("double_quant", True),
                                   bnb_4bit_compute_dtype=getattr(torch, params.get("compute_dtype", "bfloat16")),
                                   llm_int8_skip_modules=skip)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant,
                                                 device_map="cuda" if cuda else "cpu")
    write_probe(model, out, ids)
    model.save_pretrained(out)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu"}
