"""AutoAWQ (archived) in its own environment: ``python run_autoawq.py REQUEST.json``. No quantmill imports."""

import sys

from _protocol import serve


def quantize(request, ids):
    import torch
    from awq import AutoAWQForCausalLM

    params = request["config"]["params"]
    quant_config = {"zero_point": not params.get("sym", False), "q_group_size": params.get("group_size", 128),
                    "w_bit": 4, "version": params.get("version", "GEMM")}
    keep = [p for p in params.get("ignore", ["lm_head"]) if p != "lm_head"]
    if keep:
        quant_config["modules_to_not_convert"] = keep
    model = AutoAWQForCausalLM.from_pretrained(request["model"], low_cpu_mem_usage=True, use_cache=False)
    model.quantize(None, quant_config=quant_config, calib_data=ids, n_parallel_calib_samples=None,
                   max_calib_samples=len(ids), max_calib_seq_len=len(ids[0]))
    shard = {"shard_size": params["max_shard_size"]} if "max_shard_size" in params else {}
    model.save_quantized(request["out"], **shard)
    return {"device": "cuda" if torch.cuda.is_available() else "cpu"}


if __name__ == "__main__":
    sys.exit(serve("autoawq", quantize))
