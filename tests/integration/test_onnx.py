"""ONNX through the same pipeline, validation and registry as every other format: ONNX Runtime GenAI's model builder
makes the models, ONNX Runtime scores them against the unquantized ONNX model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantmill import constants as C
from quantmill.backends import RUNTIMES
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.errors import PreflightError
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from tests.conftest import compose_in

RECIPES = ["onnx_int4_cpu", "onnx_int4_dml", "onnx_fp16_cuda", "onnx_int4_gptq"]


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    cfg = compose_in(root, f"recipe=[{','.join(RECIPES)}]")
    outcomes = {o.spec_id: o for o in run_config(cfg)}
    return root, cfg, outcomes


def test_onnx_recipes_are_built_validated_and_published(onnx_run):
    root, cfg, outcomes = onnx_run
    assert all(o.ok for o in outcomes.values()), [(o.spec_id, o.error, o.result.get("failed"))
                                                  for o in outcomes.values()]
    store = open_store(cfg.store)
    int4 = store.files(store.lookup(outcomes["quantize:onnx_int4_cpu"].key))
    made = json.loads((int4 / C.RESULT_FILE).read_text())
    assert made["quant_type"] == "INT4" and made["block_size"] == 32 and made["algorithm"] == "k_quant"
    import onnx

    graph = onnx.load(str(int4 / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nbits)
    genai = json.loads((store.files(store.lookup(outcomes["quantize:onnx_int4_dml"].key)) / "genai_config.json")
                       .read_text())
    assert "dml" in json.dumps(genai["model"]["decoder"]["session_options"]).lower()
    # measured against the unquantized ONNX model: int4 moves the distribution, fp16 hardly
    kld = {r: outcomes[f"validate:{r}"].result["mean_kld"] for r in RECIPES}
    assert 0 < kld["onnx_fp16_cuda"] < 1e-4 < kld["onnx_int4_cpu"] < 0.15, kld
    assert outcomes["validate:onnx_int4_cpu"].result["bits_per_weight"] < \
        outcomes["validate:onnx_fp16_cuda"].result["bits_per_weight"]
    registry = LocalRegistry(root / "store" / C.REGISTRY_DIR)
    assert sorted(registry.names()) == sorted(f"tiny-llama-{r}" for r in RECIPES)
    card = registry.card("tiny-llama-onnx_int4_cpu", 1)
    assert "library_name: onnxruntime-genai" in card and "- onnx" in card and "import onnxruntime_genai" in card
    assert registry.get("tiny-llama-onnx_int4_cpu")["format"] == "onnx"
    catalogue = (root / "store" / C.REGISTRY_DIR / "index.html").read_text()
    assert catalogue.count('data-family="onnx"') == 1 and "onnx INT4" in catalogue


def test_an_int4_model_keeps_the_weights_of_its_gptq_checkpoint(onnx_run):
    """``params.source``: GPTQModel calibrates a checkpoint as a step of its own; the builder packs GPTQ's scales into
    the ONNX model unchanged, where the round-to-nearest recipe computes scales of its own."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    root, cfg, outcomes = onnx_run
    store = open_store(cfg.store)
    source = outcomes["quantize:onnx_int4_gptq.source"]
    assert source.result["method"] == "gptq" and source.result["backend"] == "gptqmodel"
    made = outcomes["quantize:onnx_int4_gptq"]
    assert made.result["source"] == {"method": "gptq", "quant_type": "W4A16"}
    provenance = json.loads((store.root / "objects" / made.key / C.PROVENANCE_FILE).read_text())
    inputs = {d["name"]: d for d in provenance["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert f"sha256:{inputs['input:source']['digest']['sha256']}" == source.digest  # keyed by the checkpoint it read

    gptq = load_file(str(next(store.files(store.lookup(source.key)).glob("model*.safetensors"))))
    name = "model.layers.0.mlp.down_proj"
    expected = gptq[f"{name}.scales"].astype(np.float32).T  # (groups, out) -> (out, groups)

    def scales(recipe):
        artifact = store.files(store.lookup(outcomes[f"quantize:{recipe}"].key))
        model = onnx.load(str(artifact / "model.onnx"))
        init = {i.name: i for i in model.graph.initializer}
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "layers.0/mlp/down_proj" in n.name)
        return numpy_helper.to_array(init[node.input[2]]).astype(np.float32).reshape(expected.shape)

    np.testing.assert_array_equal(scales("onnx_int4_gptq"), expected)
    assert not np.allclose(scales("onnx_int4_cpu"), expected)  # the round-to-nearest model's own scales
    assert 0 < outcomes["validate:onnx_int4_gptq"].result["mean_kld"] < 0.15


def test_the_onnx_reference_matches_the_gguf_reference(onnx_run, tmp_path):
    """The unquantized ONNX model (fp32) and llama.cpp's F16 GGUF score the same text alike: the ONNX logits are the
    model's, window by window."""
    root, cfg, outcomes = onnx_run
    store = open_store(cfg.store)
    onnx_ppl = outcomes["validate:reference-onnx"].result["ppl"]
    gguf = {o.spec_id: o for o in run_config(compose_in(root, "recipe=[gguf_f16]", "publish.enabled=false"))}
    assert gguf["validate:reference-gguf"].result["ppl"] == pytest.approx(onnx_ppl, rel=2e-3)
    runtime = RUNTIMES.get("onnx")
    evalset = store.files(store.lookup(outcomes["validate:evalset"].key))
    from quantmill.evaluation.evaluate import load_evalset

    tokens, _ = load_evalset(evalset)
    with runtime.load(store.files(store.lookup(outcomes["convert:onnx-fp32"].key)), n_ctx=256) as model:
        full = runtime.logits(model, tokens[0][:64].tolist())
        prefix = runtime.logits(model, tokens[0][:32].tolist())
        generated = runtime.generate(model, tokens[0][:8].tolist(), 8)
        assert runtime.tokenize(model, "The miller") == runtime.tokenize(model, "The miller")
    assert full.shape == (64, 1024) and np.allclose(full[:32], prefix, atol=1e-3)  # causal: a prefix is itself
    assert 1 <= len(generated) <= 8 and generated[0] == int(np.argmax(full[7]))  # greedy follows the logits


def test_an_architecture_the_builder_lacks_is_refused_before_download(tmp_path, tiny_model):
    from quantmill.plan.build import plan

    config = json.loads((tiny_model / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    config["model_type"] = "falcon"
    (tiny_model / "config.json").write_text(json.dumps(config))
    cfg = compose_in(tmp_path, "model=local", f"model.path={tiny_model}", "model.name=odd", "recipe=[onnx_int4_cpu]")
    with pytest.raises(PreflightError, match=r"is a FalconForCausalLM, which ONNX Runtime GenAI's model builder"):
        plan(cfg, open_store(cfg.store))


@pytest.mark.parametrize("override, message", [
    ("recipe.onnx_int4_cpu.params.block_size=24", "block_size 24 unsupported; choose one of 16, 32, 64, 128, 256"),
    ("recipe.onnx_int4_cpu.params.accuracy_level=7", "accuracy_level 7 out of range; choose 0 to 4"),
    ("recipe.onnx_int4_cpu.quant_type=INT3", "quant_type 'INT3' unknown to the ONNX model builder"),
    ("+recipe.onnx_int4_cpu.params.group=8", "unknown params ['group']"),
    ("+recipe.onnx_int4_cpu.params.source.method=fp8", "params.source.method 'fp8' is not a checkpoint the ONNX"),
    ("recipe.onnx_int4_gptq.params.source.quant_type=W8A16", "quant_type must be INT4 and params.source.quant_type"),
    ("recipe.onnx_int4_gptq.params.source.params.group_size=48", "group_size 48 does not divide"),
])
def test_bad_onnx_settings_are_one_line_before_work(tmp_path, override, message):
    from quantmill.plan.build import plan

    cfg = compose_in(tmp_path, f"recipe=[{override.split('.')[1]}]", override)
    with pytest.raises(PreflightError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan(cfg, open_store(cfg.store))
    assert not (tmp_path / "store" / "objects").exists() or not any((tmp_path / "store" / "objects").iterdir())
