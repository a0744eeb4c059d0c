"""Bad input is refused before heavy work, with one line naming the thing, the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantmill import constants as C
from quantmill.errors import ConfigError, ModelSourceError, PreflightError, StoreFullError
from quantmill.plan.build import plan
from quantmill.plan.spec import check_space, resolve
from quantmill.store import open_store
from tests.conftest import compose_in


def _plan(tmp_path: Path, model_dir: Path, *extra: str):
    cfg = compose_in(tmp_path, "model=local", f"model.path={model_dir}", "model.name=damaged", *extra)
    store = open_store(cfg.store)
    return plan(cfg, store), store


def _nothing_stored(tmp_path: Path) -> bool:
    objects = tmp_path / "store" / C.OBJECTS_DIR
    return not objects.exists() or not any(objects.iterdir())


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_local_copy_of_bundled_model_plans(tmp_path, tiny_model):
    the_plan, _ = _plan(tmp_path, tiny_model)
    assert the_plan.source.architecture == "LlamaForCausalLM"
    assert [s.id for s in the_plan][:4] == ["download", "validate:evalset", "calibrate:dataset", "convert:gguf-f16"]


def test_model_without_tokenizer(tmp_path, tiny_model):
    (tiny_model / "tokenizer.json").unlink()
    (tiny_model / "tokenizer.model").unlink()
    with pytest.raises(ModelSourceError) as e:
        _plan(tmp_path, tiny_model)
    assert "model 'damaged' has no tokenizer (tokenizer.json or tokenizer.model)" in _one_line(e)
    assert _nothing_stored(tmp_path)


def test_safetensors_truncated_by_one_byte(tmp_path, tiny_model):
    weights = tiny_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ModelSourceError) as e:
        _plan(tmp_path, tiny_model)
    assert "model.safetensors is 1 byte shorter than its header declares" in _one_line(e)
    assert _nothing_stored(tmp_path)


def _pickle_only(model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny_model):
    _pickle_only(tiny_model)
    with pytest.raises(ModelSourceError) as e:
        _plan(tmp_path, tiny_model)
    assert "ships only pickle weights (pytorch_model.bin)" in _one_line(e)
    assert "model.allow_pickle=true" in str(e.value)
    the_plan, _ = _plan(tmp_path, tiny_model, "model.allow_pickle=true")
    assert "pytorch_model.bin" in the_plan.specs["download"].config["files"]


def test_remote_code_is_refused_unless_trusted(tmp_path, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tiny_model / "config.json").write_text(json.dumps(config))
    (tiny_model / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(PreflightError) as e:
        _plan(tmp_path, tiny_model)
    assert "declares custom code (auto_map: AutoModelForCausalLM -> modeling_evil.EvilForCausalLM)" in _one_line(e)
    the_plan, _ = _plan(tmp_path, tiny_model, "model.trust_remote_code=true")
    assert "modeling_evil.py" in the_plan.specs["download"].config["files"]


def test_architecture_llama_cpp_cannot_convert_is_refused_in_preflight(tmp_path, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    config["architectures"] = ["WhisperForConditionalGeneration"]
    (tiny_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError) as e:
        _plan(tmp_path, tiny_model)
    assert "has architecture 'WhisperForConditionalGeneration', which llama.cpp's converter" in _one_line(e)
    assert _nothing_stored(tmp_path)


def test_unknown_quant_type_lists_llama_cpp_types(tmp_path, tiny_model):
    with pytest.raises(PreflightError) as e:
        _plan(tmp_path, tiny_model, "recipe.gguf_q4_k_m.quant_type=Q4_K_XL")
    message = _one_line(e)
    assert "recipe 'gguf_q4_k_m': quant_type 'Q4_K_XL' is not a llama.cpp type; known:" in message
    assert "Q4_K_M" in message and "Q8_0" in message


def test_unknown_backend_lists_known_ones(tmp_path, tiny_model):
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, tiny_model, "recipe.gguf_q8_0.method=awqq")
    assert _one_line(e).startswith("unknown quantizer 'awqq'; known: autoawq, autogptq, bitsandbytes, gguf, gguf_auto, gptqmodel")


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelSourceError, match=r"directory .*/nope does not exist; fix model.path"):
        _plan(tmp_path, tmp_path / "nope")


def test_store_too_small_is_refused_before_any_step(tmp_path, tiny_model):
    the_plan, store = _plan(tmp_path, tiny_model, "store.quota_bytes=1000000")
    with pytest.raises(StoreFullError) as e:
        check_space(the_plan, resolve(the_plan, store), store)
    assert "has 1000000 bytes available but this run needs about" in _one_line(e)
    assert _nothing_stored(tmp_path)


def test_publishing_without_validation_is_refused_in_preflight(tmp_path, tiny_model):
    with pytest.raises(PreflightError) as e:
        _plan(tmp_path, tiny_model, "validate.enabled=false")
    assert "publishing needs a passed validation but validate.enabled=false" in _one_line(e)


def test_evaluation_text_shorter_than_one_window(tmp_path, tiny_model):
    short = tmp_path / "short.txt"
    short.write_text("The miller carried a map.")
    with pytest.raises(PreflightError) as e:
        _plan(tmp_path, tiny_model, f"validate.eval_files=[{short}]")
    assert "evaluation text (short.txt) has" in _one_line(e)
    assert "shorter than one window of validate.n_ctx=256" in str(e.value)


def test_context_beyond_the_models_maximum(tmp_path, tiny_model):
    with pytest.raises(PreflightError) as e:
        _plan(tmp_path, tiny_model, "validate.n_ctx=4096")
    assert "validate.n_ctx 4096 is beyond model 'damaged''s maximum context 512" in _one_line(e)


def test_runtime_not_installed_names_package_and_pool(tmp_path, tiny_model, monkeypatch):
    from quantmill.toolchain import llamacpp

    monkeypatch.setenv("QUANTMILL_LLAMA_CPP", str(tmp_path / "no-build"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llamacpp, "_candidates", lambda: [tmp_path / "no-build"])
    llamacpp.locate.cache_clear()
    try:
        with pytest.raises(PreflightError) as e:
            _plan(tmp_path, tiny_model)
    finally:
        llamacpp.locate.cache_clear()
    message = _one_line(e)
    assert message.startswith("runtime 'llamacpp' (validates format 'gguf') is not installed here: llama.cpp build")
    assert "pool offering capability 'llamacpp'" in message


def test_unknown_gate_lists_known_gates(tmp_path, tiny_model):
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, tiny_model, "+recipe.gguf_q8_0.gates.max_kld=0.1")
    assert "recipe 'gguf_q8_0': unknown gate(s) max_kld; known: max_mean_kld" in _one_line(e)


def test_negative_queue_ahead_is_refused(tmp_path, tiny_model):
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, tiny_model, "infra.queue_ahead=-1")
    assert _one_line(e) == "infra.queue_ahead -1 is out of range; set infra.queue_ahead=0 or more"
    assert _nothing_stored(tmp_path)
