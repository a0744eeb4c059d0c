"""Where the probe and the compressed save run after llm-compressor's ``oneshot`` on a CUDA GPU (an experiment).

After ``oneshot`` the weights stay offloaded to the CPU, so a forward (the quantize step's probe) copies every
layer to the GPU. Variant ``none`` probes and saves the model as ``oneshot`` leaves it (what the backend does);
``dispatch`` first moves it onto the GPU with compressed-tensors' ``dispatch_model``. Prints each phase, the
output's digest (equal in both) and the peak GPU memory. FP8 dynamic (data-free), synthetic bfloat16 checkpoint:

    python bench/probe_placement.py llama-1.1b FP8_DYNAMIC none|dispatch

Measured and rejected: the GPU saves a second or two and costs the whole model in GPU memory.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM


def digest(d):
    return hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in sorted(d.glob("*.safetensors")))).hexdigest()[:16]


def one(model_dir, scheme, variant, out):
    t = {}
    last = time.perf_counter()
    def mark(n):
        nonlocal last
        now = time.perf_counter(); t[n] = round(now - last, 2); last = now
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto"); mark("load")
    torch.cuda.reset_peak_memory_stats()
    oneshot(model=model, recipe=[QuantizationModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])]); mark("oneshot")
    peak_oneshot = torch.cuda.max_memory_allocated()
    p = next(model.parameters())
    info = {"param_device": str(p.device), "type": type(model.model.layers[0].mlp.gate_proj._parameters).__name__}
    if variant == "dispatch":
        from compressed_tensors.offload import dispatch_model
        dispatch_model(model); mark("dispatch")
        info["param_device_after"] = str(next(model.parameters()).device)
    ids = torch.tensor([list(range(3, 35))])
    with torch.inference_mode():
        logits = model(input_ids=ids.to(next(model.parameters()).device)).logits[0, -8:].float().cpu()
    torch.cuda.synchronize(); mark("probe")
    model.save_pretrained(out, save_compressed=True); mark("save")
    return {"variant": variant, "scheme": scheme, "phases": t, "info": info, "digest": digest(out),
            "peak_oneshot_gib": round(peak_oneshot / 2**30, 2), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "logits_sum": float(logits.double().sum())}


if __name__ == "__main__":
    shape, scheme, variant = sys.argv[1:4]
    d = Path(f"/tmp/models/{shape}")
    synthetic.make(shape, d, dtype="bfloat16")
    out = Path(f"/tmp/out-{shape}-{scheme}-{variant}")
    print("RESULT", json.dumps(one(d, scheme, variant, out)), flush=True)
