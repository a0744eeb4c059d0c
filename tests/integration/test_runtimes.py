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
