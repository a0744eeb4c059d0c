"""AutoGPTQ (archived) in its own environment: ``python run_autogptq.py REQUEST.json``. Standalone on purpose."""

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    request = json.loads(Path(path).read_text())
    work, config = Path(request["work"]), request["config"]
    try:
        import torch
        from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
        from safetensors.numpy import load_file

        torch.manual_seed(0)
        ids = load_file(str(Path(request["calibration"]) / "calibration.safetensors"))["input_ids"].tolist()
        params = config["params"]
        quant = BaseQuantizeConfig(bits=8 if config["quant_type"] == "W8A16" else 4,
                                   group_size=params.get("group_size", 128), desc_act=params.get("desc_act", False),
                                   sym=params.get("sym", True))
        model = AutoGPTQForCausalLM.from_pretrained(request["model"], quant)
        rows = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
                for r in ids]
        model.quantize(rows)
        model.save_quantized(request["out"], use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - reported to the parent in one line
        import traceback

        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        (work / "error.json").write_text(json.dumps({"error": f"autogptq: {type(e).__name__}: {first}"}))
        return 1
    (work / "result.json").write_text(json.dumps({"device": "cuda", "calibration_samples": len(ids)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
