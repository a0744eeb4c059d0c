"""MLX (mlx-lm) and safetensors passthrough through the same pipeline, validation and registry as GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantmill import constants as C
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.errors import PreflightError
from quantmill.outcome import RAN
from quantmill.plan.build import plan
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from tests.conftest import compose_in

pytestmark = pytest.mark.slow
# MLX's CPU backend multiplies quantized weights one token at a time (~44 ms/token on the bundled model), so
# these runs evaluate 2 windows of 128 tokens; on Apple silicon Metal kernels make the default settings cheap.
SHORT_EVAL = ("validate.n_chunks=2", "validate.n_ctx=128")


def test_mlx_4bit_and_8bit_are_validated_and_published(tmp_path):
    outcomes = {o.spec_id: o for o in run_config(compose_in(tmp_path, "recipe=[mlx_4bit,mlx_8bit]", *SHORT_EVAL))}
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error, o.result.get("failed")) for o in outcomes.values()]
    assert outcomes["validate:reference-mlx"].status == RAN  # KLD against the unquantized MLX model
    kld4, kld8 = (outcomes[f"validate:mlx_{b}bit"].result["mean_kld"] for b in (4, 8))
    assert 0 < kld8 < 0.005 < kld4 < 0.15
    assert outcomes["validate:mlx_4bit"].result["bits_per_weight"] == pytest.approx(4.5, abs=0.05)
    store = open_store(compose_in(tmp_path).store)
    artifact = store.files(store.lookup(outcomes["quantize:mlx_4bit"].key))
    config = json.loads((artifact / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert (artifact / "tokenizer.json").is_file() and not (artifact / "README.md").exists()
    registry = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR)
    assert registry.names() == ["tiny-llama-mlx_4bit", "tiny-llama-mlx_8bit"]
    assert "library_name: mlx" in registry.card("tiny-llama-mlx_4bit", 1)


def test_unquantized_mlx_matches_the_reference_logits(tmp_path):
    """mlx-lm's unquantized conversion (float32) against transformers on the source checkpoint: |diff| < 1e-3."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantmill.backends import CONVERTERS
    from quantmill.backends.mlx_runtime import MlxRuntime

    out = tmp_path / "mlx-float32"
    out.mkdir()
    CONVERTERS.get("mlx").convert(BUNDLED_ROOT / "tiny-llama", out, {"dtype": "float32"})
    ids = [1, 450, 234, 310, 7, 300, 301, 280, 290, 11]
    runtime = MlxRuntime()
    with runtime.load(out, n_ctx=64) as model:
        mlx_logits = runtime.logits(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(BUNDLED_ROOT / "tiny-llama", dtype=torch.float32)
    with torch.inference_mode():
        hf_logits = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(mlx_logits - hf_logits).max() < 1e-3


def test_mlx_recipe_for_an_architecture_mlx_lm_lacks_is_refused_before_download(tmp_path, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    config["model_type"] = "quantmill_nonexistent"
    (tiny_model / "config.json").write_text(json.dumps(config))
    cfg = compose_in(tmp_path, "model=local", f"model.path={tiny_model}", "model.name=odd", "recipe=[mlx_4bit]")
    with pytest.raises(PreflightError, match=r"model 'odd' has model_type 'quantmill_nonexistent' .* which mlx-lm"):
        plan(cfg, open_store(cfg.store))
    assert not any((tmp_path / "store" / C.OBJECTS_DIR).iterdir())


def test_passthrough_casts_reshards_and_keeps_the_tokenizer(tmp_path):
    outcomes = {o.spec_id: o for o in run_config(compose_in(
        tmp_path, "recipe=[safetensors_bf16,safetensors_f16]", "recipe.safetensors_bf16.params.max_shard_size=1MB"))}
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error) for o in outcomes.values()]
    store = open_store(compose_in(tmp_path).store)
    bf16 = store.files(store.lookup(outcomes["quantize:safetensors_bf16"].key))
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    shards = sorted(p.name for p in bf16.glob("*.safetensors"))
    assert len(shards) >= 3 and (bf16 / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (bf16 / name).read_bytes() == (BUNDLED_ROOT / "tiny-llama" / name).read_bytes(), name
    f16 = outcomes["validate:safetensors_f16"].result
    assert f16["mean_kld"] == pytest.approx(0, abs=1e-9) and f16["top1_agreement"] == 1.0  # F16 source: lossless
    assert 0 < outcomes["validate:safetensors_bf16"].result["mean_kld"] < 1e-3
    card = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).card("tiny-llama-safetensors_bf16", 1)
    assert "library_name: transformers" in card
