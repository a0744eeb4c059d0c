"""Hardware targets: recipes chosen by the decision table, footprints estimated from config.json alone."""

from __future__ import annotations

import json

import pytest

from quantmill.cli import main
from quantmill.config import compose
from quantmill.errors import PreflightError
from quantmill.estimate import Shape, weights_bytes
from quantmill.plan.build import plan
from quantmill.store import open_store
from tests.conftest import CONF, compose_in, overrides_for, run_inline

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "tie_word_embeddings": False, "torch_dtype": "float16"}
# Published file sizes of Llama-2-7B (bytes, GB = 1e9): the F16 checkpoint and the common GGUF quants.
PUBLISHED = {("passthrough", "safetensors", "F16"): 13.48e9, ("gguf", "gguf", "Q8_0"): 7.16e9,
             ("gguf", "gguf", "Q6_K"): 5.53e9, ("gguf", "gguf", "Q5_K_M"): 4.78e9, ("gguf", "gguf", "Q4_K_M"): 4.08e9,
             ("gguf", "gguf", "Q4_0"): 3.83e9, ("gguf", "gguf", "Q3_K_M"): 3.30e9, ("gguf", "gguf", "Q2_K"): 2.83e9}


@pytest.fixture
def config_only_7b(tmp_path):
    """A model directory holding only a 7B-shape config.json: no weights, no tokenizer."""
    d = tmp_path / "llama-2-7b-shape"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA2_7B))
    return d


@pytest.mark.parametrize("method, fmt, quant_type", sorted(PUBLISHED))
def test_estimates_match_published_llama2_7b_sizes_within_10_percent(method, fmt, quant_type):
    shape = Shape.from_config(LLAMA2_7B)
    assert shape.params == pytest.approx(6.738e9, rel=1e-3)
    estimate = weights_bytes(shape, method, fmt, quant_type, {})
    assert estimate == pytest.approx(PUBLISHED[(method, fmt, quant_type)], rel=0.10)


def test_estimates_match_what_the_pipeline_makes(tmp_path):
    """On the bundled model the same estimates against the artifacts' real sizes: within 10 %."""
    cfg = compose_in(tmp_path, "recipe=[gguf_q4_k_m,gguf_q8_0,mlx_4bit,safetensors_bf16]",
                     "validate.n_chunks=1", "validate.n_ctx=64", "publish.enabled=false")
    store, the_plan, results = run_inline(cfg)
    for recipe in cfg.recipe:
        estimate = the_plan.specs[f"validate:{recipe}"].config["estimate"]["weights_bytes"]
        record = json.loads((store.files(results[f"validate:{recipe}"].ref) / "validation.json").read_text())
        assert record["size_bytes"] == pytest.approx(estimate, rel=0.10), recipe


def test_plan_for_rtx2060_lists_fp16_as_not_fitting_and_int4_as_fitting(config_only_7b, tmp_path, capsys):
    code = main(["plan", "--json", "target=rtx2060_12gb", "model=local", f"model.path={config_only_7b}",
                 "model.name=llama-2-7b", *overrides_for(tmp_path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    fit = {r["recipe"]: r for r in out["fit"]}
    assert not fit["safetensors_f16"]["fits"] and fit["safetensors_f16"]["total_bytes"] > fit["safetensors_f16"]["budget_bytes"]
    assert fit["gguf_q4_k_m"]["fits"] and fit["awq_w4a16"]["fits"]
    assert fit["awq_w4a16"]["available"] is True
    assert fit["gguf_q4_k_m"]["kv_cache_bytes"] == 2 * 32 * 4096 * 32 * 128 * 2
    assert out["steps"] is None and "only the fit was estimated" in out["note"]


def test_recommend_for_rtx2060_and_a_7b_config_picks_4_bit_and_says_why(config_only_7b, tmp_path, capsys):
    """Nothing of the 7B is published: recommend names the recipe to build, the first of the target's table that
    fits by estimate, and the FP16 it passed over with its size; a bare name with nothing published is one line."""
    model = ["model=local", f"model.path={config_only_7b}", *overrides_for(tmp_path)]
    assert main(["recommend", "llama-2-7b", "--target", "rtx2060_12gb", "--json", *model]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert captured.err.startswith("quantmill: the registry was not read (store.root ") and "from estimates" in \
        captured.err
    rows = {r["name"]: r for r in out["rows"]}
    assert out["estimate"] is True
    assert [r["name"] for r in out["rows"] if r["rank"]] == ["awq_w4a16", "gguf_q4_k_m"]
    f16 = rows["safetensors_f16"]
    assert f16["rank"] is None and f16["need_bytes"] > 11.5 * 2**30 and f16["verdict"].startswith("needs ")
    awq = rows["awq_w4a16"]
    assert (awq["format"], awq["quant_type"]) == ("compressed-tensors", "W4A16") and awq["need_bytes"] < 11.5 * 2**30
    assert out["recommendation"] == (
        f"nothing of llama-2-7b is published yet; build awq_w4a16: the first of rtx2060_12gb's recipes "
        f"(safetensors_f16, awq_w4a16, gguf_q4_k_m) that fits 11.5 GiB with 4096 tokens of KV cache, by estimate "
        f"from the model's config ({awq['need_bytes'] / 2**30:.3g} GiB: {awq['size_bytes'] / 2**30:.3g} of weights); "
        f"before it in the table: safetensors_f16 needs {f16['need_bytes'] / 2**30:.3g} GiB")
    assert main(["recommend", "llama-2-7b", "--target", "rtx2060_12gb", *overrides_for(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "store.root" in err and len(err.strip().splitlines()) == 1


def test_target_selects_the_decision_tables_recipes():
    assert list(compose(["target=m2_air_16gb"], conf_dir=CONF).recipe) == ["mlx_4bit", "mlx_8bit", "gguf_q4_k_m"]
    assert list(compose(["target=cpu_32gb"], conf_dir=CONF).recipe) == ["gguf_q4_k_m", "gguf_q5_k_m", "gguf_q8_0"]
    # an explicit recipe list wins over the table
    assert list(compose(["target=cpu_32gb", "recipe=[gguf_q6_k]"], conf_dir=CONF).recipe) == ["gguf_q6_k"]


def test_recipes_that_do_not_fit_are_dropped(tmp_path):
    # A budget of 1.5 MiB: the bundled model's Q4_K_M (~1.0 MiB) and Q5_K_M fit, its Q8_0 (~1.8 MiB) does not.
    cfg = compose_in(tmp_path, "target=cpu_32gb", "target.memory_gb=0.0015", "target.overhead_gb=0",
                     "target.context=64")
    the_plan = plan(cfg, open_store(cfg.store))
    assert {s.recipe for s in the_plan if s.recipe} == {"gguf_q4_k_m", "gguf_q5_k_m"}
    assert len(the_plan.warnings) == 1 and the_plan.warnings[0].startswith("target cpu_32gb: dropped gguf_q8_0")


def test_target_too_small_for_every_recipe_says_what_would_fit(config_only_7b, tmp_path):
    cfg = compose_in(tmp_path, "target=phone_8gb", "model=local", f"model.path={config_only_7b}", "model.name=l7")
    with pytest.raises(PreflightError) as e:
        plan(cfg, open_store(cfg.store))
    assert "target phone_8gb (3.0 GiB) is too small for every recipe it recommends for model 'l7'" in str(e.value)
    assert "no context fits: gguf_q2_k's weights alone need 2.6 GiB" in str(e.value)
    roomy = compose_in(tmp_path, "target=phone_8gb", "target.memory_gb=3.5", "model=local",
                       f"model.path={config_only_7b}", "model.name=l7")
    with pytest.raises(PreflightError, match=r"gguf_q2_k would fit with target.context=\d+ or less"):
        plan(roomy, open_store(roomy.store))


def _gpu_entry(recipe: str, size: int, peak: int, speed: float, curve: list[tuple[int, float]] | None = None,
               gpu: str = "NVIDIA H100 80GB HBM3") -> dict:
    """A registry entry as a CUDA worker publishes it (quantmill.execute._publish), with its measured figures."""
    points = [{"gpu_layers": n, "generation_tokens_per_second": s, "joules_per_generated_token": None}
              for n, s in curve or []]
    return {"name": f"llama-8b-{recipe}", "version": 2, "model": "llama-8b", "recipe": recipe, "validated": True,
            "gpu": gpu, "size_bytes": size, "validated_n_ctx": 256, "validated_in": "llamacpp", "kv_cache_bytes_per_token": 131072,
            "metrics": {"peak_gpu_memory_bytes": peak, "generation_tokens_per_second": speed},
            "energy": {"joules_per_generated_token": 1.5},
            **({"offload_curve": {"available": True, "points": points}} if curve else {})}


def test_plan_uses_what_the_same_gpu_class_measured_and_says_so():
    """Measured rows: the file's size, the runtime's memory beyond weights and KV (peak less both, at the
    validation's context) and speed; a file too large for the card runs with as many layers as the measured
    curve says fit, at the curve's speed. Other GPU classes' figures and unmeasured recipes stay estimates."""
    from quantmill.estimate import Fit
    from quantmill.registry import measured

    target = compose(["target=rtx4090_24gb"], conf_dir=CONF).target
    assert target.gpu == "RTX 4090"
    gib = 2**30
    fits = [Fit(r, True, 5 * gib, 1 * gib, 1 * gib, 7 * gib, int(target.memory_gb * gib))
            for r in ("safetensors_f16", "awq_w4a16", "gguf_q8_0")]
    f16 = _gpu_entry("safetensors_f16", 15 * gib, 17 * gib, 40.0, gpu="NVIDIA GeForce RTX 4090")
    q8 = _gpu_entry("gguf_q8_0", 26 * gib, 27 * gib, 90.0, [(33, 90.0), (24, 20.0), (16, 12.0), (8, 8.0), (0, 6.0)],
                    gpu="NVIDIA GeForce RTX 4090")
    awq_elsewhere = _gpu_entry("awq_w4a16", 4 * gib, 6 * gib, 50.0)  # an H100's figure says nothing of a 4090
    rows = {r["recipe"]: r for r in measured.apply(fits, [f16, q8, awq_elsewhere], target, "llama-8b")}

    kv_then, kv_now = 131072 * 256, 131072 * target.context
    assert rows["safetensors_f16"]["overhead_bytes"] == 17 * gib - 15 * gib - kv_then
    assert rows["safetensors_f16"]["total_bytes"] == 15 * gib + kv_now + 17 * gib - 15 * gib - kv_then
    assert rows["safetensors_f16"]["fits"] and rows["safetensors_f16"]["generation_tokens_per_second"] == 40.0
    assert rows["safetensors_f16"]["source"] == "measured in llamacpp on NVIDIA GeForce RTX 4090 (llama-8b-safetensors_f16 v2)"
    # 26 GiB of Q8_0 on a 23 GiB card: 24 of 33 layers hold 18.9 GiB, 33 would not; the curve's 24-layer speed
    assert not rows["gguf_q8_0"]["fits"] and rows["gguf_q8_0"]["gpu_layers"] == "24 of 33"
    assert rows["gguf_q8_0"]["generation_tokens_per_second"] == 20.0
    assert rows["awq_w4a16"]["source"] == "estimate" and rows["awq_w4a16"]["total_bytes"] == 7 * gib

    # A curve that carries its points' weight bytes (read from the file's tensor table) is taken at its word: here
    # the last 24 blocks weigh more than an even spread says, and 16 layers is the point that fits.
    for point, weight in zip(q8["offload_curve"]["points"], (26 * gib, 23 * gib, 15 * gib, 7 * gib, 0)):
        point["gpu_weight_bytes"] = weight
    rows = {r["recipe"]: r for r in measured.apply(fits, [q8], target, "llama-8b")}
    assert rows["gguf_q8_0"]["gpu_layers"] == "16 of 33" and rows["gguf_q8_0"]["generation_tokens_per_second"] == 12.0


def test_plan_of_a_published_model_reads_the_registry(tmp_path, capsys):
    """A model published from a machine without a GPU: the registry is read, no row claims a GPU measurement."""
    from quantmill.backends import PUBLISHERS

    store, _, _ = run_inline(compose_in(tmp_path, "recipe=[gguf_q8_0]", "validate.n_chunks=1", "validate.n_ctx=64"))
    [entry] = PUBLISHERS.get("local").registry(None, store).entries()
    assert (entry["validated_in"], entry["validated_n_ctx"]) == ("llamacpp", 64) and "gpu" not in entry
    assert main(["plan", "--json", "target=rtx4090_24gb", "recipe=[gguf_q8_0]", *overrides_for(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in out["fit"]] == ["estimate"] and "fit_note" not in out

    # The bytes a point of the offload curve puts on the GPU: the last blocks, then the output head; never the
    # token embeddings, which llama.cpp keeps on the CPU.
    from gguf import GGUFReader

    from quantmill.toolchain.gguf_info import offloaded_bytes

    [gguf] = store.files(store.lookup(entry["artifact"]["key"])).glob("*.gguf")
    size = {t.name: int(t.n_bytes) for t in GGUFReader(gguf).tensors}
    block = {i: sum(b for n, b in size.items() if n.startswith(f"blk.{i}.")) for i in (0, 1)}
    head = sum(b for n, b in size.items() if n.startswith("output"))
    assert offloaded_bytes(gguf, [3, 2, 1, 0]) == [sum(size.values()) - size["token_embd.weight"],
                                                   sum(block.values()), block[1], 0]
    assert sum(block.values()) + head == sum(size.values()) - size["token_embd.weight"]
