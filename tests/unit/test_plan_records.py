"""Each step kind is described once (plan/records.py): every spec the planner makes is its kind's record, with its
kind's inputs, and the executor has a function for every kind."""

from __future__ import annotations

import pytest

from quantmill.execute import RUNNERS
from quantmill.plan.build import plan
from quantmill.plan.records import KINDS, QuantizeRecord, kind_of
from quantmill.store import open_store
from tests.conftest import compose_in


def test_every_kind_has_its_function():
    assert set(RUNNERS) == set(KINDS)


@pytest.mark.parametrize("recipes", ["gguf_q8_0,gguf_q4_k_m", "gptq_w4a16,mlx_4bit,safetensors_f16"])
def test_every_spec_is_its_kinds_record(tmp_path, recipes):
    cfg = compose_in(tmp_path, f"recipe=[{recipes}]")
    kinds = set()
    for spec in plan(cfg, open_store(cfg.store)):
        kind = kind_of(spec.step, spec.config)
        kinds.add(kind.name)
        assert spec.step == kind.step, spec.id
        assert set(spec.inputs) <= set(kind.inputs), (spec.id, dict(spec.inputs))
        assert kind.record.of(spec.config).to_config() == dict(spec.config), spec.id
    assert {"download", "evalset", "dataset", "quantize", "reference", "artifact", "publish"} <= kinds


def test_an_unset_optional_field_leaves_the_config_and_so_the_key_unchanged():
    base = dict(method="gptq", format="compressed-tensors", quant_type="W4A16", imatrix=False, params={})
    assert "backend" not in QuantizeRecord(**base).to_config()
    assert QuantizeRecord(**base, backend="gptqmodel").to_config()["backend"] == "gptqmodel"
