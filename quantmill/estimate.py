"""Footprint estimates from a model's config.json alone (no weights): will a recipe's output fit a target?

weights = parameters x bits per weight / 8 (per format; embeddings kept at 16 bit where the method keeps them),
KV cache = 2 (K and V) x layers x context x KV heads x head dim x 2 bytes (f16), plus the target's runtime
overhead. Checked against published sizes of Llama-2-7B files within 10 % (tests/test_targets.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

GIB = 1 << 30

# Bits per weight of recipes by (method, quant type). GGUF figures are llama.cpp's own for Llama models; MLX
# affine adds one f16 scale and one f16 bias per group; AWQ/GPTQ W4A16 (group 128) and FP8 quantize the linear
# layers only, embeddings and lm_head stay 16-bit.
GGUF_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.68, "Q5_0": 5.5,
            "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.55, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35}
LINEAR_ONLY = {("awq", "W4A16"): 4.25, ("awq", "W4A16_ASYM"): 4.38, ("gptq", "W4A16"): 4.25,
               ("gptq", "W4A16_ASYM"): 4.38, ("gptq", "W8A16"): 8.25, ("gptq", "W8A8"): 8.0,
               ("smoothquant", "W8A8"): 8.0, ("fp8", "FP8"): 8.0, ("fp8", "FP8_DYNAMIC"): 8.0,
               ("fp8", "FP8_BLOCK"): 8.0, ("nvfp4", "NVFP4"): 4.5, ("nvfp4", "NVFP4A16"): 4.5,
               ("bnb", "NF4"): 4.13, ("bnb", "FP4"): 4.13, ("bnb", "INT8"): 8.0}
# Recipes the hardware tables recommend that this build cannot make yet (their quantizers are not registered):
# estimated and shown, never run.
KNOWN_RECIPES: dict[str, tuple[str, str]] = {}


@dataclass(frozen=True)
class Shape:
    params: int
    embedding_params: int  # token embeddings + untied lm_head
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "Shape":
        h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim") or h // heads
        attention = h * heads * head_dim * 2 + 2 * h * kv * head_dim
        mlp = 3 * h * i
        embedding = v * h * (1 if c.get("tie_word_embeddings") else 2)
        return cls(params=n * (attention + mlp + 2 * h) + embedding + h, embedding_params=embedding, layers=n,
                   kv_heads=kv, head_dim=head_dim)

    def kv_cache_bytes(self, context: int) -> int:
        return 2 * self.layers * context * self.kv_heads * self.head_dim * 2


def weights_bytes(shape: Shape, method: str, fmt: str, quant_type: str, params: Mapping[str, Any]) -> int:
    q = quant_type.upper()
    if params.get("budget_gib"):  # a per-tensor mix for a file size (gguf_auto, mlx_auto)
        return int(float(params["budget_gib"]) * 2**30)
    if fmt == "gguf":
        return int(shape.params * float(params.get("budget_bpw") or GGUF_BPW.get(q, 16)) / 8)
    if fmt == "safetensors" and method == "passthrough":
        return shape.params * (4 if q == "F32" else 2)
    if fmt == "mlx" and params.get("budget_bpw"):  # a per-layer mix: its budget, scales and biases included
        return int(shape.params * float(params["budget_bpw"]) / 8)
    if fmt == "mlx":
        bits = int(q[1:]) if q[1:].isdigit() else int(q.split("_")[2])  # Q4 -> 4; MIXED_3_6 -> 6 (upper bound)
        return int(shape.params * (bits + 32 / params.get("group_size", 64)) / 8)
    bpw = LINEAR_ONLY.get((method, q))
    if bpw is None:
        raise KeyError(f"no size estimate for method {method!r} type {quant_type!r}")
    return int((shape.params - shape.embedding_params) * bpw / 8) + shape.embedding_params * 2


@dataclass(frozen=True)
class Fit:
    recipe: str
    available: bool
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def fit_table(model_config: Mapping[str, Any], target: Any, recipes: Mapping[str, Any]) -> list[Fit]:
    """One row per recipe the target recommends (available or not), in the target's order of preference, and one
    per other recipe the config chose."""
    shape = Shape.from_config(model_config)
    kv = shape.kv_cache_bytes(target.context)
    overhead = int(target.overhead_gb * GIB)
    budget = int(target.memory_gb * GIB)
    rows = []
    # The target's recipes in its order, then any others the config chose (recipe=[...] over the table).
    for name in [*target.recipes, *(r for r in recipes if r not in target.recipes)]:
        if name in recipes:
            r = recipes[name]
            weights = weights_bytes(shape, r.method, r.format, r.quant_type or "", r.params)
        elif name in KNOWN_RECIPES:
            method, quant = KNOWN_RECIPES[name]
            weights = weights_bytes(shape, method, "safetensors", quant, {})
        else:  # recommended by the table, not chosen here: nothing to size it by
            continue
        rows.append(Fit(name, name in recipes, weights, kv, overhead, weights + kv + overhead, budget))
    return rows
