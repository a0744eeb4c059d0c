"""AutoGPTQ (archived) in its own environment: ``python run_autogptq.py REQUEST.json``. No quantmill imports."""

import sys

from _protocol import serve


def quantize(request, ids):
    import torch
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    config, params = request["config"], request["config"]["params"]
    quant = BaseQuantizeConfig(bits=8 if config["quant_type"] == "W8A16" else 4,
                               group_size=params.get("group_size", 128), desc_act=params.get("desc_act", False),
                               sym=params.get("sym", True))
    model = AutoGPTQForCausalLM.from_pretrained(request["model"], quant)
    model.quantize([{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
                    for r in ids])
    shard = {"max_shard_size": params["max_shard_size"]} if "max_shard_size" in params else {}
    model.save_quantized(request["out"], use_safetensors=True, **shard)
    return {"device": "cuda"}


if __name__ == "__main__":
    sys.exit(serve("autogptq", quantize))
