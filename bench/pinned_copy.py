"""How fast offloaded weights reach the GPU from pageable and from page-locked (registered) CPU memory, and what
registering costs: tensors shaped like a Llama's linear weights (bfloat16), each copied with ``.to(device)`` as
compressed-tensors' CPU offload does (synchronously).

    python bench/pinned_copy.py llama-8b|llama-1.1b

Measured (H200, anonymous memory): 14 GB in 1.5-1.7 s pageable, 0.26 s page-locked, 0.54 s to register. The
weights transformers loads are memory-mapped from the checkpoint instead, where registering costs 6-8 s at 8B
(bench/probe_onload.py): not used.
"""
import json
import sys
import time

import torch

SHAPES = {"llama-8b": (32, 4096, 1024, 14336), "llama-1.1b": (22, 2048, 256, 5632)}


def main(shape: str) -> dict:
    layers, hidden, kv, inter = SHAPES[shape]
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
                 (hidden, inter)]
    weights = [torch.empty(s, dtype=torch.bfloat16).normal_() for _ in range(layers) for s in per_layer]
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    torch.cuda.init()
    torch.empty(1, device="cuda")

    def copy_all() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for w in weights:
            w.to("cuda")
        torch.cuda.synchronize()
        return time.perf_counter() - t

    row = {"shape": shape, "gb": round(gb, 2), "device": torch.cuda.get_device_name()}
    row["pageable_s"] = [round(copy_all(), 3) for _ in range(2)]
    cudart = torch.cuda.cudart()
    t = time.perf_counter()
    for w in weights:
        assert cudart.cudaHostRegister(w.data_ptr(), w.numel() * w.element_size(), 0) == 0
    row["register_s"] = round(time.perf_counter() - t, 3)
    row["pinned_is_pinned"] = weights[0].is_pinned()
    row["pinned_s"] = [round(copy_all(), 3) for _ in range(2)]
    t = time.perf_counter()
    for w in weights:
        cudart.cudaHostUnregister(w.data_ptr())
    row["unregister_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    pinned_copies = [w.pin_memory() for w in weights[:len(weights) // 4]]
    row["pin_memory_copy_quarter_s"] = round(time.perf_counter() - t, 3)
    del pinned_copies
    return row


if __name__ == "__main__":
    for s in sys.argv[1:] or ["llama-8b"]:
        print(json.dumps(main(s)))
