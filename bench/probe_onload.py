"""The probe after llm-compressor's ``oneshot`` on a CUDA GPU: how many copies its forward makes of the offloaded
weights, what it computes, and what page-locking the weights changes (an experiment).

compressed-tensors onloads a parameter on every access while offloading is on; its quantized forward reads the
weight once to fake-quantize it and the module's own forward reads it again. Variants of the probe, in this order:
  per_layer  each decoder layer inside ``disable_offloading`` (one copy per tensor, dropped after the layer)
  plain      the forward as is (the backend without its single-copy probe)
  whole      the whole forward inside ``disable_offloading`` (the whole model onloaded)
Each prints seconds, copies ("onloads") and peak GPU memory and, unless --quick, the largest logit difference to
the saved checkpoint reloaded by transformers (as saved, and decompressed) and to the unquantized source.
Weights: ``pageable`` as transformers loads them (memory-mapped from the checkpoint); ``pinned`` page-locked with
cudaHostRegister before ``oneshot``; ``pinned_after`` the offloaded tensors page-locked after it.

    python bench/probe_onload.py llama-8b|llama-1.1b FP8_DYNAMIC|W4A16 pageable|pinned|pinned_after [float32]
        [--one-file] [--quick]

Measured (H200): ``plain`` computes the unquantized model for FP8 and W4A16 (its logits equal the source's);
``per_layer`` equals the reloaded checkpoint exactly in float32 and takes half the time; page-locking costs more
than it saves (registering the memory-mapped weights: 6.3 s before oneshot, 8.3 s after, at 8B).
"""
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
import torch  # noqa: E402
from compressed_tensors.offload import disable_offloading  # noqa: E402
from compressed_tensors.offload.cache.cpu import CPUCache  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ONLOADS = [0]
_onload = CPUCache.onload


def counting(self, offloaded):
    ONLOADS[0] += 1
    return _onload(self, offloaded)


CPUCache.onload = counting
SHARD = "--one-file" not in sys.argv
IDS = torch.tensor([list(range(3, 35))])


def probe(model, per_layer):
    hooks, stack = [], contextlib.ExitStack()
    if per_layer == "whole":
        stack.enter_context(disable_offloading())
    elif per_layer:
        for layer in model.model.layers:
            hooks.append(layer.register_forward_pre_hook(lambda m, a: stack.enter_context(disable_offloading())))
            hooks.append(layer.register_forward_hook(lambda m, a, o: stack.close()))
    ONLOADS[0] = 0
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=IDS.cuda()).logits[0, -8:].float().cpu()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    stack.close()
    for h in hooks:
        h.remove()
    return logits, {"s": round(seconds, 3), "onloads": ONLOADS[0]}


def main(shape, scheme, variant, dtype="auto"):
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    d = Path(f"/tmp/models/{shape}")
    synthetic.make(shape, d, dtype="bfloat16")
    row = {"shape": shape, "scheme": scheme, "variant": variant}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    row["load_s"] = round(time.perf_counter() - t, 2)
    torch.empty(1, device="cuda")
    if variant == "pinned":
        t = time.perf_counter()
        cudart = torch.cuda.cudart()
        codes = [int(cudart.cudaHostRegister(p.data_ptr(), p.numel() * p.element_size(), 0))
                 for p in model.parameters()]
        row["register_s"] = round(time.perf_counter() - t, 3)
        row["register_failed"] = sum(c != 0 for c in codes)
    t = time.perf_counter()
    oneshot(model=model, recipe=[QuantizationModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])])
    row["oneshot_s"] = round(time.perf_counter() - t, 2)
    if variant == "pinned_after":  # page-lock what oneshot left offloaded
        from compressed_tensors.offload.cache.base import OffloadCache
        t = time.perf_counter()
        cudart = torch.cuda.cudart()
        tensors = [v for m in model.modules() if isinstance(m._parameters, OffloadCache)
                   for v in m._parameters.offloaded_values.values() if v is not None and v.device.type == "cpu"]
        codes = [int(cudart.cudaHostRegister(v.data_ptr(), v.numel() * v.element_size(), 0)) for v in tensors]
        row["register_s"] = round(time.perf_counter() - t, 3)
        row["registered"] = sum(c == 0 for c in codes)
        row["register_failed"] = sorted(set(codes) - {0})
    torch.cuda.reset_peak_memory_stats()
    results = {}
    for name, per_layer in (("per_layer", True), ("plain", False), ("per_layer2", True), ("plain2", False),
                            ("whole", "whole")):
        results[name], row[name] = probe(model, per_layer)
        row[name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    out = Path(f"/tmp/out-{shape}-{scheme}-{variant}" + ("" if SHARD else "-onefile"))
    t = time.perf_counter()
    model.save_pretrained(out, save_compressed=True, **({"max_shard_size": "1GB"} if SHARD else {}))
    row["save_s"] = round(time.perf_counter() - t, 2)
    del model
    if "--quick" in sys.argv:  # timings only
        return row
    source = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, device_map="cuda")
    with torch.inference_mode():
        unquantized = source(input_ids=IDS.cuda()).logits[0, -8:].float().cpu()
    del source
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map="cuda")
    with torch.inference_mode():
        ref = reloaded(input_ids=IDS.cuda()).logits[0, -8:].float().cpu()
    row["max_abs_diff_to_reload"] = {k: round(float((v - ref).abs().max()), 4) for k, v in results.items()}
    del reloaded
    from transformers import CompressedTensorsConfig
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map="cuda",
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.inference_mode():
        ref_dense = dense(input_ids=IDS.cuda()).logits[0, -8:].float().cpu()
    row["max_abs_diff_to_dense_reload"] = {k: round(float((v - ref_dense).abs().max()), 4) for k, v in results.items()}
    row["reload_abs_max"] = round(float(ref.abs().max()), 3)
    row["unquantized_max_abs_diff_to_reload"] = round(float((unquantized - ref).abs().max()), 4)
    row["argmax_equal_to_reload"] = {k: bool((v.argmax(-1) == ref.argmax(-1)).all()) for k, v in results.items()}
    return row


if __name__ == "__main__":
    print("RESULT", json.dumps(main(*[a for a in sys.argv[1:5] if not a.startswith("--")])), flush=True)
