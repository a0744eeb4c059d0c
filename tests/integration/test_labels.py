"""Labels that tell the truth: a k-quant asked of a model whose widths its 256-wide blocks do not divide is stored
by llama.cpp in other types; the entry, card and search say what the file holds, and a gate refuses it unless
relaxed."""

from __future__ import annotations

import json
import shutil

import pytest

from quantmill import constants as C
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.prefect.launch import run_config
from quantmill.registry.operations import Filters, nominal_bits, search
from tests.conftest import compose_in

QUICK = ["validate.n_chunks=2", "validate.n_ctx=128", "calibration.num_samples=16", "calibration.seq_len=128"]


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """A Llama of hidden width 192 and FFN width 320 (neither divisible by 256), random weights, the bundled
    tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("narrow") / "narrow-llama"
    bundled = json.loads((BUNDLED_ROOT / "tiny-llama" / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bundled["vocab_size"], hidden_size=192, intermediate_size=320,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=512, bos_token_id=bundled["bos_token_id"],
                         eos_token_id=bundled["eos_token_id"], tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory)
    for f in BUNDLED_ROOT.joinpath("tiny-llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, directory / f.name)
    return directory


def test_a_fallen_back_k_quant_is_refused_then_labelled_with_what_it_holds(tmp_path, narrow_model):
    base = ["model=local", f"model.path={narrow_model}", "model.name=narrow", "recipe=[gguf_q4_k_m]",
            "validate.gates.max_mean_kld=null", "recipe.gguf_q4_k_m.gates.max_mean_kld=null",
            "recipe.gguf_q4_k_m.gates.max_ppl_ratio=null", *QUICK]
    refused = {o.spec_id: o for o in run_config(compose_in(tmp_path, *base))}
    quantized = refused["quantize:gguf_q4_k_m"].result
    assert quantized["quant_type_requested"] == "Q4_K_M" and quantized["fallback_share"] > 0.5, quantized
    assert "Q4_K" not in quantized["tensor_types"] or quantized["tensor_types"]["Q4_K"] < 0.5, quantized
    assert not refused["publish:gguf_q4_k_m"].ok and "max_fallback_share" in refused["publish:gguf_q4_k_m"].error

    relaxed = {o.spec_id: o for o in run_config(compose_in(tmp_path, *base, "validate.gates.max_fallback_share=null"))}
    assert relaxed["publish:gguf_q4_k_m"].ok, relaxed["publish:gguf_q4_k_m"].error
    registry = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR)
    entry = registry.get("narrow-gguf_q4_k_m")
    assert entry["quant_type"] == quantized["quant_type"] and entry["quant_type"].endswith(" mix"), entry
    assert entry["quant_type_requested"] == "Q4_K_M" and entry["tensor_types"] == quantized["tensor_types"]
    assert nominal_bits(entry) != 4 and entry["bits_per_weight"] > 5
    assert "narrow-gguf_q4_k_m" not in {e["name"] for e in search(registry, Filters(bits=4))}
    card = registry.card("narrow-gguf_q4_k_m", entry["version"])
    assert "| Recipe asked for | Q4_K_M; llama.cpp stored" in card and f"| Quant type | {entry['quant_type']} |" in card
