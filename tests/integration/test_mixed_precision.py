"""Mixed precision toward a budget: one sensitivity measurement per model, a llama.cpp type per tensor chosen from it
for each budget, validated like every artifact; at the size of a uniform k-quant the mix is measured closer to the
original."""

from __future__ import annotations

import json

import pytest

from quantmill import constants as C
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.outcome import CACHED, RAN
from quantmill.plan.build import plan
from quantmill.plan.spec import HIT, MISS, resolve
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from quantmill.toolchain.energy import EnergyMeter
from quantmill.toolchain.gguf_info import tensor_types
from tests.conftest import compose_in

# Fewer calibration windows than the default: the ranking of tensors is what the test needs, and it halves the
# measurement.
FAST = "calibration.sensitivity.windows=4"
UNIFORM = ("gguf_q3_k_m", "gguf_q4_k_m")


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    uniform = {o.spec_id: o for o in run_config(compose_in(root, f"recipe=[{','.join(UNIFORM)}]"))}
    bpw = {r: uniform[f"validate:{r}"].result["bits_per_weight"] for r in UNIFORM}
    budgets = f"[{bpw['gguf_q3_k_m']},{bpw['gguf_q4_k_m']}]"
    outcomes = {o.spec_id: o for o in run_config(compose_in(
        root, f"recipe=[{','.join(UNIFORM)},gguf_auto]", f"recipe.gguf_auto.params.budget_bpw={budgets}", FAST))}
    return root, bpw, uniform, outcomes


def test_at_the_size_of_each_uniform_k_quant_the_mix_is_measured_closer(ladder):
    root, bpw, uniform, outcomes = ladder
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error) for o in outcomes.values() if not o.ok]
    assert outcomes["calibrate:sensitivity-gguf"].status == RAN  # once, for both budgets
    assert [s for s in outcomes if s.startswith("calibrate:sensitivity")] == ["calibrate:sensitivity-gguf"]
    for recipe in UNIFORM:
        assert outcomes[f"validate:{recipe}"].status == CACHED
        auto = outcomes[f"validate:gguf_auto-{bpw[recipe]:g}"].result
        same = uniform[f"validate:{recipe}"].result
        assert auto["size_bytes"] <= same["size_bytes"] * 1.01, (recipe, auto["size_bytes"], same["size_bytes"])
        assert auto["size_bytes"] >= same["size_bytes"] * 0.97, (recipe, auto["size_bytes"], same["size_bytes"])
        # the goal: at least 15 % lower mean KLD at the same size, measured on the evaluation text
        assert auto["mean_kld"] <= 0.85 * same["mean_kld"], (recipe, auto["mean_kld"], same["mean_kld"])


def test_the_file_holds_the_chosen_mix_and_the_record_says_what_was_predicted(ladder):
    root, bpw, _, outcomes = ladder
    store = open_store(compose_in(root).store)
    recipe = f"gguf_auto-{bpw['gguf_q4_k_m']:g}"
    made = outcomes[f"quantize:{recipe}"]
    files = store.files(store.lookup(made.key))
    rules = dict(line.split("=") for line in (files / "tensor-types.txt").read_text().split())
    stored = tensor_types(next(files.glob("*.gguf")))
    assert len(rules) == 16 and len(set(rules.values())) >= 3, rules  # 2 layers x 7 matrices + embeddings + output
    for pattern, qtype in rules.items():
        name = pattern.strip("^$").replace("\\", "")
        assert stored[name] == qtype.upper(), (name, stored[name], qtype)
    result = json.loads((files / C.RESULT_FILE).read_text())
    assert result["predicted_kld"] > 0 and result["sensitivity_method"] == "measured"
    sensitivity = outcomes["calibrate:sensitivity-gguf"]
    assert sensitivity.result["passes"] == 6 + 16 * 6  # a uniform file per type, then every tensor at every type
    assert 0.5 < sensitivity.result["estimate_rank_correlation"] <= 1
    card = LocalRegistry(root / "store" / C.REGISTRY_DIR).card(f"tiny-llama-{recipe}", 1)
    assert "| Mixed precision |" in card and "| Predicted mean KLD |" in card
    # energy per token from this machine's counters, or, where it has none, why not (never a guess)
    validation = outcomes[f"validate:{recipe}"]
    record = json.loads((store.files(store.lookup(validation.key)) / C.VALIDATION_FILE).read_text())
    meter = EnergyMeter(("cpu",))
    if meter.available:
        assert record["energy"]["joules_per_generated_token"] > 0, record["energy"]
    else:
        assert record["energy"] == {"available": False, "detail": meter.reason}
        assert f"| Energy | {meter.reason} |" in card
    report = json.loads((root / "store" / "reports" / "tiny-llama" / "report.json").read_text())
    rows = {r["recipe"]: r for r in report["artifacts"]}
    assert rows[recipe]["predicted_kld"] == pytest.approx(result["predicted_kld"])
    html = (root / "store" / "reports" / "tiny-llama" / "report.html").read_text()
    assert 'data-family="gguf auto"' in html and "Per-tensor mixes" in html


def test_a_file_size_or_a_target_is_a_budget_too(ladder):
    """``budget_gib`` is the file's size (its metadata included); ``budget_target`` is what a profile holds beside
    its KV cache and overhead, turned into a file size in preflight."""
    root, _, uniform, _ = ladder
    size = uniform["validate:gguf_q4_k_m"].result["size_bytes"]
    by_size = {o.spec_id: o for o in run_config(compose_in(
        root, "recipe=[gguf_auto]", "~recipe.gguf_auto.params.budget_bpw",
        f"+recipe.gguf_auto.params.budget_gib={size / 2**30}", FAST, "publish.enabled=false"))}
    assert by_size["calibrate:sensitivity-gguf"].status == CACHED
    made = by_size["validate:gguf_auto"].result["size_bytes"]
    assert 0.97 * size <= made <= size, (made, size)
    store = open_store(compose_in(root).store)
    by_target = plan(compose_in(root, "recipe=[gguf_auto]", "~recipe.gguf_auto.params.budget_bpw",
                                "+recipe.gguf_auto.params.budget_target=phone_8gb", FAST), store)
    params = by_target.specs["quantize:gguf_auto"].config["params"]
    assert params["budget_from"] == "target phone_8gb, 2048 tokens of context", params
    assert 2.0 < params["budget_gib"] < 3.0, params  # 3 GB less the tiny model's KV cache


def test_another_budget_reuses_the_sensitivity_and_a_mix_past_its_gate_is_not_published(ladder):
    root = ladder[0]
    overrides = ["recipe=[gguf_auto]", "recipe.gguf_auto.params.budget_bpw=3.5", FAST,
                 "recipe.gguf_auto.gates.max_mean_kld=0.000001"]
    cfg = compose_in(root, *overrides)
    store = open_store(cfg.store)
    status = resolve(plan(cfg, store), store).status
    assert status["calibrate:sensitivity-gguf"] == HIT and status["quantize:gguf_auto"] == MISS
    outcomes = {o.spec_id: o for o in run_config(cfg)}
    assert outcomes["calibrate:sensitivity-gguf"].status == CACHED
    verdict = outcomes["validate:gguf_auto"].result
    assert verdict["status"] == C.FAILED and "max_mean_kld" in " ".join(verdict["failed"]), verdict
    assert "tiny-llama-gguf_auto" not in LocalRegistry(root / "store" / C.REGISTRY_DIR).names()


def test_mlx_auto_uses_the_same_measurement_and_beats_uniform_4_bit_at_its_size(ladder):
    """The GGUF sensitivity drives mlx-lm's per-layer predicate: the layers get the widths the search chose, and at
    MLX 4-bit's size the mix measures closer to the original in MLX itself."""
    root = ladder[0]
    outcomes = {o.spec_id: o for o in run_config(compose_in(
        root, "recipe=[mlx_4bit,mlx_auto]", "recipe.mlx_auto.params.budget_bpw=4.5", FAST))}
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error) for o in outcomes.values() if not o.ok]
    assert outcomes["calibrate:sensitivity-gguf"].status == CACHED
    uniform, auto = outcomes["validate:mlx_4bit"].result, outcomes["validate:mlx_auto"].result
    assert auto["size_bytes"] <= uniform["size_bytes"] * 1.01, (auto["size_bytes"], uniform["size_bytes"])
    assert auto["mean_kld"] <= 0.85 * uniform["mean_kld"], (auto["mean_kld"], uniform["mean_kld"])
    store = open_store(compose_in(root).store)
    files = store.files(store.lookup(outcomes["quantize:mlx_auto"].key))
    made = json.loads((files / C.RESULT_FILE).read_text())
    layers = json.loads((files / "config.json").read_text())["quantization"]
    assert made["unmapped_layers"] == [] and len(set(made["mix"].values())) >= 2, made["mix"]
    assert layers["model.layers.0.self_attn.q_proj"]["bits"] == made["mix"]["blk.0.attn_q.weight"]
    assert layers["lm_head"]["bits"] == made["mix"]["output.weight"]
