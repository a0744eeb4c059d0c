"""AutoAWQ (archived) in its own environment: ``python run_autoawq.py REQUEST.json``. Standalone on purpose."""

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    request = json.loads(Path(path).read_text())
    work, config = Path(request["work"]), request["config"]
    try:
        import torch
        from awq import AutoAWQForCausalLM
        from safetensors.numpy import load_file

        torch.manual_seed(0)
        ids = load_file(str(Path(request["calibration"]) / "calibration.safetensors"))["input_ids"].tolist()
        params = config["params"]
        quant_config = {"zero_point": not params.get("sym", False), "q_group_size": params.get("group_size", 128),
                        "w_bit": 4, "version": params.get("version", "GEMM")}
        keep = [p for p in params.get("ignore", ["lm_head"]) if p != "lm_head"]
        if keep:
            quant_config["modules_to_not_convert"] = keep
        model = AutoAWQForCausalLM.from_pretrained(request["model"], low_cpu_mem_usage=True, use_cache=False)
        model.quantize(None, quant_config=quant_config, calib_data=ids, n_parallel_calib_samples=None,
                       max_calib_samples=len(ids), max_calib_seq_len=len(ids[0]))
        model.save_quantized(request["out"])
    except Exception as e:  # noqa: BLE001 - reported to the parent in one line
        import traceback

        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        (work / "error.json").write_text(json.dumps({"error": f"autoawq: {type(e).__name__}: {first}"}))
        return 1
    (work / "result.json").write_text(json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu",
                                                  "calibration_samples": len(ids)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
