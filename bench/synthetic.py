"""Synthetic Llama checkpoints of real shapes with random weights, for timing (quality is meaningless).

The tokenizer is the bundled tiny model's, padded with unused pieces to the shape's vocabulary size, so
llama.cpp's converter and every quantizer accept the checkpoint exactly as they would a real Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

# The bundled model's folder by path: this module also runs on GPU machines without quantmill's dependencies.
BUNDLED_ROOT = Path(__file__).resolve().parents[1] / "quantmill" / "bundled"
SHAPES = {
    # the bundled model's shape, for trying a benchmark quickly on a CPU
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024),
    # TinyLlama-1.1B: 1.10B parameters
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
    # Llama-3.2-3B body with a 32k vocabulary: 3.02B parameters
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=32000),
    # Llama-3-8B body with a 32k vocabulary: 7.24B parameters
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000),
}
SHARD_BYTES = 2 << 30


def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(s["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _tokenizer(out: Path, vocab_size: int) -> None:
    tok = json.loads((BUNDLED_ROOT / "tiny-llama" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for n in range(len(vocab), vocab_size):
        vocab[f"<unused_{n}>"] = n
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BUNDLED_ROOT / "tiny-llama" / name, out / name)


def make(shape: str, out: Path, seed: int = 0, dtype: str = "float16") -> Path:
    """Write the checkpoint (safetensors shards + index, config, tokenizer) unless it is already there.

    ``dtype`` float16, or bfloat16 as Llama 3 ships (written through torch: numpy has no bfloat16).
    """
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", **s}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _tokenizer(out, s["vocab_size"])
    rng = np.random.default_rng(seed)
    on_gpu = dtype == "bfloat16" and _cuda()  # an 8B shape's 7e9 normals take a minute on one core, not a second
    if on_gpu:
        import torch

        gen = torch.Generator("cuda").manual_seed(seed)
    shards: list[dict] = [{}]
    size = 0
    for name, shp in tensor_shapes(s).items():
        if len(shp) == 1:
            t = np.ones(shp, dtype=np.float16)
        elif on_gpu:
            t = (torch.randn(shp, generator=gen, device="cuda") * 0.02).to(torch.bfloat16).cpu()
        else:
            t = rng.standard_normal(shp, dtype=np.float32) * 0.02
            t = t.astype(np.float16) if dtype == "float16" else t
        n = int(np.prod(shp))
        if size + n * 2 > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n * 2
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, out / fname, dtype)
        for name, t in shard.items():
            index["weight_map"][name] = fname
            index["metadata"]["total_size"] += int(np.prod(t.shape)) * 2
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    done.write_text("")
    return out


def _save(shard: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    if dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file

        save_file({k: v if torch.is_tensor(v) else torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
                   for k, v in shard.items()}, str(path))
    else:
        from safetensors.numpy import save_file

        save_file(shard, str(path))


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def n_params(shape: str) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(SHAPES[shape]).values())
