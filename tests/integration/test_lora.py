"""Merging a LoRA adapter into its base before quantizing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantmill import constants as C
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.errors import PreflightError
from quantmill.plan.build import plan
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from tests.conftest import compose_in, run_inline

pytestmark = pytest.mark.slow
BASE = BUNDLED_ROOT / "tiny-llama"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter trained for a few optimizer steps on the bundled model (so its B matrices are not zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "up_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batch = torch.randint(3, 1024, (4, 64), generator=torch.Generator().manual_seed(0))
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("tiny-llama")
    return out


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_merged_logits_equal_base_plus_adapter(tmp_path, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store, _, results = run_inline(compose_in(tmp_path, f"model.adapter={adapter}", "recipe=[gguf_q8_0]",
                                              "validate.enabled=false", "publish.enabled=false"))
    merged_dir = store.files(results["merge"].ref)
    ids = [1, 450, 234, 310, 7, 300, 301, 280, 290, 11, 500, 600]
    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32), ids)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), adapter)
    expected = _logits(unmerged, ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), ids)
    # The merge is saved in the base's float16, so weights round to 2^-11 relative: logits agree to 2e-2 (their
    # scale is ~20), while the adapter itself moves them by far more than that.
    assert np.abs(merged - expected).max() < 2e-2
    assert np.abs(expected - base).max() > 0.2

    stmt = store.statement(results["merge"].ref.key)
    deps = {d["name"]: d for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert deps["input:base"]["digest"]["sha256"] == results["download"].ref.digest.removeprefix("sha256:")
    assert deps["input:adapter"]["digest"]["sha256"] == results["download:adapter"].ref.digest.removeprefix("sha256:")
    adapter_stmt = store.statement(results["download:adapter"].ref.key)
    names = [d["name"] for d in adapter_stmt["predicate"]["buildDefinition"]["resolvedDependencies"]]
    assert "adapter" in names
    # everything downstream starts from the merge
    assert results["convert:gguf-f16"].ref.key != run_inline(compose_in(
        tmp_path / "plain", "recipe=[gguf_q8_0]", "validate.enabled=false", "publish.enabled=false"))[2][
        "convert:gguf-f16"].ref.key


def test_gguf_and_mlx_recipes_run_on_the_merged_model(tmp_path, adapter):
    outcomes = {o.spec_id: o for o in run_config(compose_in(
        tmp_path, f"model.adapter={adapter}", "recipe=[gguf_q8_0,mlx_8bit]", "validate.n_chunks=2", "validate.n_ctx=128"))}
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error) for o in outcomes.values() if not o.ok]
    the_plan = plan(compose_in(tmp_path, f"model.adapter={adapter}", "recipe=[gguf_q8_0,mlx_8bit]"),
                    open_store(compose_in(tmp_path).store))
    assert the_plan.specs["convert:gguf-f16"].inputs == {"model": "merge"}
    assert the_plan.specs["quantize:mlx_8bit"].inputs == {"model": "merge"}
    from quantmill.backends.local_publisher import LocalRegistry

    card = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).card("tiny-llama-gguf_q8_0", 1)
    assert f"with LoRA adapter `{adapter}` merged in" in card and "- lora-merged" in card


def test_adapter_of_another_base_is_refused_naming_both(tmp_path, adapter):
    import shutil

    other = tmp_path / "other-lora"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (other / "adapter_config.json").write_text(json.dumps(config))
    cfg = compose_in(tmp_path, f"model.adapter={other}")
    with pytest.raises(PreflightError) as e:
        plan(cfg, open_store(cfg.store))
    assert (f"adapter '{other}' was trained on base 'meta-llama/Llama-2-7b-hf', but the configured base model is "
            f"'tiny-llama'") in str(e.value)
    assert not (tmp_path / "store" / C.OBJECTS_DIR).exists() or not any((tmp_path / "store" / C.OBJECTS_DIR).iterdir())
