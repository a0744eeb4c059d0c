"""A target's fit from measurements where there are some: the model's published artifacts validated on the same
class of GPU (the target's ``gpu``, found in the validating machine's GPU name) give the file's real size, the
validating runtime's memory beyond weights and KV cache (peak GPU memory at the validation's context, less both), the
generation speed and energy, and for GGUF the layer-offload curve: how many layers a smaller card holds and how
fast generation is then. Other recipes keep the estimate from config.json, and each row says which it is."""

from __future__ import annotations

from typing import Any, Iterable

from quantmill.estimate import Fit
from quantmill.registry.operations import footprint_bytes, overhead_bytes, same_gpu


def measured_entry(entries: Iterable[dict[str, Any]], model: str, recipe: str, gpu: str) -> dict[str, Any] | None:
    """The newest validated artifact of ``model`` made by ``recipe`` and measured on a GPU of class ``gpu``."""
    found = [e for e in entries if e.get("model") == model and e.get("recipe") == recipe and e.get("validated")
             and same_gpu(gpu, e.get("gpu")) and (e.get("metrics") or {}).get("peak_gpu_memory_bytes")]
    return max(found, key=lambda e: e.get("version", 0), default=None)


def _on_gpu(curve: dict[str, Any] | None, room: int, weights: int) -> dict[str, Any] | None:
    """The measured curve point with the most layers whose weights fit ``room`` bytes, or None when not even a
    quarter of them fit. A point's bytes are read from the file's tensor table when the curve was measured
    (``gpu_weight_bytes``); curves recorded without them spread the weights evenly over the layers."""
    if not curve or not curve.get("available") or room <= 0:
        return None
    points = [p for p in curve["points"] if p.get("generation_tokens_per_second")]
    if not points:
        return None
    layers = max(p["gpu_layers"] for p in points)
    even = max(1, weights // layers)
    fitting = [p for p in points
               if 0 < p["gpu_layers"] and p.get("gpu_weight_bytes", p["gpu_layers"] * even) <= room]
    best = max(fitting, key=lambda p: p["gpu_layers"], default=None)
    return {**best, "of_layers": layers} if best else None


def apply(fits: list[Fit], entries: list[dict[str, Any]], target: Any, model: str) -> list[dict[str, Any]]:
    """Each fit row as JSON with ``source`` (``estimate``, or where it was measured), measured where it can be."""
    rows = []
    budget = int(target.memory_gb * 2**30)
    for fit in fits:
        row = {**fit.to_json(), "source": "estimate", "generation_tokens_per_second": None,
               "joules_per_generated_token": None, "gpu_layers": None}
        entry = measured_entry(entries, model, fit.recipe, getattr(target, "gpu", ""))
        if entry is None:
            rows.append(row)
            continue
        metrics, energy = entry.get("metrics") or {}, entry.get("energy") or {}
        weights = int(entry["size_bytes"])
        kv = int(entry.get("kv_cache_bytes_per_token") or 0) * target.context
        overhead, total = overhead_bytes(entry, target), footprint_bytes(entry, target)
        runtime = f" in {entry['validated_in']}" if entry.get("validated_in") else ""
        row.update(source=f"measured{runtime} on {entry['gpu']} ({entry['name']} v{entry.get('version', '?')})",
                   weights_bytes=weights, kv_cache_bytes=kv, overhead_bytes=overhead, total_bytes=total,
                   fits=total <= budget,
                   generation_tokens_per_second=metrics.get("generation_tokens_per_second"),
                   joules_per_generated_token=energy.get("joules_per_generated_token"))
        if not row["fits"]:
            point = _on_gpu(entry.get("offload_curve"), budget - kv - overhead, weights)
            if point:  # llama.cpp runs it with the rest of the layers on the CPU, as fast as the curve says
                row.update(gpu_layers=f"{point['gpu_layers']} of {point['of_layers']}",
                           generation_tokens_per_second=point["generation_tokens_per_second"],
                           joules_per_generated_token=point.get("joules_per_generated_token"))
            else:
                row.update(generation_tokens_per_second=None, joules_per_generated_token=None)
        rows.append(row)
    return rows
