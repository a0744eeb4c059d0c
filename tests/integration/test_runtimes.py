"""The validation runtimes agree with each other on the same model and the same token ids."""

from __future__ import annotations

import json

import pytest

from quantmill import constants as C
from quantmill.backends import RUNTIMES
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.steps import validate
from tests.conftest import compose_in, run_inline

pytestmark = pytest.mark.slow


def test_runtime_registry_serves_each_format():
    assert RUNTIMES.get("llamacpp").formats == ("gguf",)
    assert "safetensors" in RUNTIMES.get("transformers").formats


def test_transformers_and_llama_cpp_agree_on_the_bundled_model(tmp_path):
    """The HF checkpoint in transformers vs its F16 GGUF in llama.cpp: same perplexity on the same ids."""
    store, _, results = run_inline(compose_in(tmp_path, "recipe=[gguf_f16]", "publish.enabled=false"))
    evalset = store.files(results["validate:evalset"].ref)
    llama_ref = json.loads((store.files(results["validate:reference-gguf"].ref) / C.RESULT_FILE).read_text())
    (tmp_path / "hf-reference").mkdir()
    hf = validate.reference(RUNTIMES.get("transformers"), BUNDLED_ROOT / "tiny-llama", evalset,
                            tmp_path / "hf-reference", threads=0)
    assert hf["scored_tokens"] == llama_ref["scored_tokens"] == 8 * 127
    assert hf["ppl"] == pytest.approx(llama_ref["ppl"], rel=2e-3)

    # and the full comparison of the checkpoint against llama.cpp's reference: near-zero divergence, exact tokenizer
    record = validate.validate(RUNTIMES.get("transformers"), BUNDLED_ROOT / "tiny-llama", evalset,
                               store.files(results["validate:reference-gguf"].ref),
                               gates={"max_mean_kld": 1e-3, "tokenizer_exact": True}, max_tokens=8, threads=0,
                               label="transformers")
    assert record["status"] == C.PASSED, validate.failed_checks(record)
    assert record["mean_kld"] < 1e-3 and record["top1_agreement"] > 0.98
    assert record["tokenizer"]["exact"] and record["bits_per_weight"] == pytest.approx(16.0)


def test_a_mixture_of_experts_model_evaluates_in_mlx_on_a_cpu(tmp_path):
    """mlx's CPU kernel for gathered expert weights takes float32 only: the runtime computes in float32 there, so a
    Mixtral (float16 and 4-bit) is evaluated instead of failing, and agrees with transformers on the same ids."""
    import shutil

    import numpy as np
    import torch
    from mlx_lm import convert
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128))
    model.to(torch.float16).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BUNDLED_ROOT / "tiny-llama" / name, hf / name)
    ids = [1, 450, 368, 310, 278, 479]
    with torch.inference_mode():
        expected = model.float()(torch.tensor([ids])).logits[0].numpy()
    runtime = RUNTIMES.get("mlx")
    convert(str(hf), mlx_path=str(tmp_path / "f16"), dtype="float16")
    convert(str(hf), mlx_path=str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    for name, tolerance in (("f16", 0.05), ("q4", 0.5)):
        with runtime.load(tmp_path / name, n_ctx=16) as m:
            got = runtime.logits(m, ids)
            assert len(runtime.generate(m, ids, 3)) <= 3
        assert got.shape == expected.shape and np.isfinite(got).all()
        assert np.abs(got - expected).max() < tolerance, (name, np.abs(got - expected).max())
