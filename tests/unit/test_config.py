"""Composition of conf/: every recipe and group composes; bad config fails at compose time with one line."""

from __future__ import annotations

import pytest
import yaml

from quantmill.config import RecipeConfig, compose
from quantmill.errors import ConfigError, PreflightError
from quantmill.plan.preflight import resolve_recipe
from tests.conftest import CONF

RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


def test_default_config_composes_to_typed_schema():
    cfg = compose([], conf_dir=CONF)
    assert list(cfg.recipe) == ["gguf_q8_0", "gguf_q4_k_m"]
    assert isinstance(cfg.recipe["gguf_q4_k_m"], RecipeConfig)
    assert cfg.recipe["gguf_q4_k_m"].quant_type == "Q4_K_M" and cfg.recipe["gguf_q4_k_m"].imatrix is True
    assert cfg.model.source == "bundled" and cfg.store.root == "artifacts"


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_is_keyed_by_its_file_name(name):
    assert set(yaml.safe_load((CONF / "recipe" / f"{name}.yaml").read_text())) == {name}
    from quantmill.backends import CONVERTERS, QUANTIZERS

    cfg = compose([f"recipe=[{name}]"], conf_dir=CONF)
    assert list(cfg.recipe) == [name]
    recipe = cfg.recipe[name]
    resolved, quantizer = resolve_recipe(name, recipe)  # what preflight makes of it: the format it will produce
    assert resolved.format in quantizer.formats and resolved.format in CONVERTERS
    assert quantizer is QUANTIZERS.get(recipe.backend or recipe.method)
    # file names say what they make: gguf_*, mlx_*, safetensors_*, or the method for torch quantizers (gptq_*, ...)
    assert name.startswith(recipe.format or recipe.method.replace("smoothquant", "w8a8"))


def test_a_format_the_quantizer_cannot_make_is_refused():
    cfg = compose(["recipe=[gguf_q8_0]", "recipe.gguf_q8_0.format=mlx"], conf_dir=CONF)
    with pytest.raises(PreflightError, match="backend 'gguf' cannot produce format 'mlx'"):
        resolve_recipe("gguf_q8_0", cfg.recipe["gguf_q8_0"])


def test_recipes_cover_the_k_quant_ladder_mlx_and_passthrough():
    assert {"gguf_f16", "gguf_q8_0", "gguf_q6_k", "gguf_q5_k_m", "gguf_q4_k_m", "gguf_q4_0", "gguf_q3_k_m",
            "gguf_q2_k", "mlx_2bit", "mlx_3bit", "mlx_4bit", "mlx_6bit", "mlx_8bit", "mlx_mixed_3_6",
            "safetensors_f16", "safetensors_bf16", "awq_w4a16", "gptq_w4a16", "gptq_w8a16", "fp8_dynamic",
            "fp8_static", "w8a8_smoothquant", "nvfp4", "bnb_nf4"} <= set(RECIPES)


def test_override_changes_one_value():
    cfg = compose(["recipe.gguf_q4_k_m.imatrix=false", "calibration.num_samples=8"], conf_dir=CONF)
    assert cfg.recipe["gguf_q4_k_m"].imatrix is False and cfg.calibration.num_samples == 8


@pytest.mark.parametrize("override, expected", [
    ("model.foo=1", "unknown config key 'model.foo'"),
    ("+model.foo=1", "unknown config key 'model.foo'; ModelConfig has: name, source"),
    ("+recipe.gguf_q8_0.bogus=1", "unknown config key 'recipe.gguf_q8_0.bogus'; RecipeConfig has: method"),
    ("+nonsense=1", "unknown config key 'nonsense'"),
])
def test_unknown_key_fails_at_compose_time(override, expected):
    with pytest.raises(ConfigError) as e:
        compose([override], conf_dir=CONF)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        compose(["recipe=[gguf_q8_0,gguf_q4_k_mm]"], conf_dir=CONF)
    message = str(e.value)
    assert message.startswith("unknown recipe 'gguf_q4_k_mm' (did you mean 'gguf_q4_k_m'?); known: ")
    assert all(name in message for name in RECIPES)


def test_missing_required_value_fails():
    with pytest.raises(ConfigError, match=r"missing required config value 'model\.(name|path)'"):
        compose(["model=local"], conf_dir=CONF)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"validate\.max_tokens.*'abc'"):
        compose(["validate.max_tokens=abc"], conf_dir=CONF)


def test_empty_recipe_list_fails():
    with pytest.raises(ConfigError, match="no recipes selected"):
        compose(["recipe=[]"], conf_dir=CONF)


def test_a_config_crosses_to_a_flow_parameter_and_back_unchanged_and_unshared():
    import dataclasses

    from omegaconf import OmegaConf

    from quantmill.config import to_config, to_dict

    cfg = compose(["recipe=[gguf_q8_0,gptq_w4a16]", "infra=prefect"], conf_dir=CONF)
    data = to_dict(cfg)
    assert data == OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # what OmegaConf would give
    back = to_config(data)
    assert back == cfg and back is not cfg
    back.recipe.clear()  # the caller's copy: the remembered one is untouched
    assert to_config(data) == cfg
    changed = {**data, "recipe": {}}  # a different dict is validated as before
    with pytest.raises(ConfigError, match="no recipes selected"):
        to_config(changed)
    assert dataclasses.asdict(to_config(dict(data))) == data


def test_runs_started_without_heartbeats_leave_the_settings_as_they_were():
    from prefect.settings import get_current_settings

    from quantmill.prefect.settings import without_run_heartbeats

    before = get_current_settings().flows.heartbeat_frequency
    for _ in range(2):  # the second time from the settings copy made the first time
        with without_run_heartbeats():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == before
