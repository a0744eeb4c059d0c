"""Calibrated torch quantizers on CPU: llm-compressor GPTQ and AWQ, GPTQModel GPTQ, bitsandbytes NF4.

The bundled model goes through the real embedded Prefect flow, is validated and published; each output loads in
transformers (in this process, not the one that quantized it) and reproduces the logits recorded right after
quantization.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from quantmill import constants as C
from quantmill.errors import PreflightError
from quantmill.plan.build import plan
from quantmill.registry.operations import nominal_bits
from quantmill.store import open_store
from tests.conftest import CONF, compose_in

pytest.importorskip("llmcompressor")

PUBLISHED = {  # registry name -> (backend, format written)
    "tiny-llama-gptq_w4a16": ("llmcompressor", "compressed-tensors"),
    "tiny-llama-awq_w4a16": ("llmcompressor", "compressed-tensors"),
    "tiny-llama-gptq_w4a16-gptqmodel": ("gptqmodel", "gptq"),
    "tiny-llama-awq_w4a16-gptqmodel": ("gptqmodel", "awq"),
}


@pytest.fixture(scope="module")
def calibrated_runs(tmp_path_factory):
    """Two pipeline runs into one store: the llm-compressor recipes, then the same recipes on GPTQModel."""
    from quantmill.prefect.launch import run_config

    pytest.importorskip("gptqmodel")
    root = tmp_path_factory.mktemp("calibrated")
    common = ("validate.n_chunks=4", "calibration.num_samples=32")
    # llm-compressor's AWQ and GPTQModel's GPTQ write shards of 1 MB (several for this model); the others one file
    first = run_config(compose_in(root, "recipe=[gptq_w4a16,awq_w4a16]", "recipe.awq_w4a16.params.max_shard_size=1MB",
                                  *common))
    second = run_config(compose_in(root, "recipe=[gptq_w4a16,awq_w4a16]", "recipe.gptq_w4a16.backend=gptqmodel",
                                   "recipe.awq_w4a16.backend=gptqmodel", "publish.name_template='{model}-{recipe}-gptqmodel'",
                                   "recipe.gptq_w4a16.params.max_shard_size=1MB", *common))
    return root, first, second


@pytest.mark.slow
def test_gptq_and_awq_on_both_backends_are_validated_and_published(calibrated_runs):
    root, first, second = calibrated_runs
    for outcomes in (first, second):
        assert all(o.ok for o in outcomes), [(o.spec_id, o.error) for o in outcomes if not o.ok]
    by_id = {o.spec_id: o for o in second}
    # the second run reuses the download and the calibration set the first computed
    assert by_id["calibrate:dataset"].status == "cached" and by_id["download"].status == "cached"
    assert by_id["quantize:gptq_w4a16"].status == "ran"
    registry = root / "store" / C.REGISTRY_DIR
    for name, (backend, fmt) in PUBLISHED.items():
        entry = json.loads((registry / name / "v1" / C.REGISTRY_ENTRY_FILE).read_text())
        assert entry["validated"] is True and entry["format"] == fmt, name
        # the scheme is the entry's quant type, so `registry ls --bits 4` finds every W4A16 version
        assert entry["quant_type"] == "W4A16" and nominal_bits(entry) == 4, entry
        card = (registry / name / "v1" / C.MODEL_CARD_FILE).read_text()
        assert "base_model_relation: quantized" in card
    # what a user pulls holds what users load: the checkpoint and its configs, not the pipeline's probe
    name = next(iter(PUBLISHED))
    pulled = root / "pulled"
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "registry", "pull", name, "--to", str(pulled),
                           f"store.root={root / 'store'}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QUANTMILL_CONF": str(CONF)})
    assert done.returncode == 0, done.stderr
    files = {p.name for p in pulled.iterdir()}
    assert C.PROBE_FILE not in files and any(f.endswith(".safetensors") for f in files), files
    verified = subprocess.run([sys.executable, "-m", "quantmill.cli", "registry", "verify", str(pulled)],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "QUANTMILL_CONF": str(CONF)})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for outcomes in (first, second):
        for o in outcomes:
            if o.step == C.VALIDATE and o.recipe:
                assert o.result["status"] == "passed"
                assert 0 < o.result["mean_kld"] < 0.05 and 0.9 < o.result["ppl_ratio"] < 1.1, o.result
                # 4-bit linear layers, 16-bit embeddings (a third of this tiny model): 7.5-8.5 bits per weight
                assert 7.5 < o.result["bits_per_weight"] < 8.5, o.result


@pytest.mark.slow
def test_a_checkpoint_decompressed_on_its_first_forward_is_not_called_native(calibrated_runs):
    """transformers' compressed-tensors route holds packed int4 until the first forward, then dense weights: the
    execution the record states is read after the runs, so a GPU load that starts "native" says what it became."""
    from quantmill.backends.transformers_runtime import TransformersRuntime

    root = calibrated_runs[0]
    entry = json.loads((root / "store" / C.REGISTRY_DIR / "tiny-llama-gptq_w4a16" / "v1" / C.REGISTRY_ENTRY_FILE)
                       .read_text())
    store = open_store(compose_in(root).store)
    artifact = store.files(store.lookup(entry["artifact"]["key"]))
    runtime = TransformersRuntime()
    with runtime.load(artifact, n_ctx=64) as model:
        model.execution = "native"  # what a load on a GPU with the format's compute capability starts as
        assert runtime.held_as(model) == "native"  # still packed
        runtime.logits(model, [1, 2, 3])
        held = runtime.held_as(model)
    # q, k, v, o, gate, up, down of the bundled model's 2 layers
    assert held == ("decompressed: 14 quantized layers held as float32 after the first forward (transformers' "
                    "compressed-tensors route has no kernel for them)")


@pytest.mark.slow
def test_outputs_reproduce_the_logits_recorded_right_after_quantization(calibrated_runs):
    from safetensors.numpy import load_file

    from quantmill.backends import RUNTIMES

    root, first, second = calibrated_runs
    store = open_store(compose_in(root, "recipe=[gptq_w4a16]").store)
    runtime = RUNTIMES.get("transformers")
    checked = 0
    for o in (*first, *second):
        if o.step != C.QUANTIZE:
            continue
        files = store.files(store.lookup(o.key))
        config = json.loads((files / "config.json").read_text())
        assert "quantization_config" in config
        probe = load_file(str(files / C.PROBE_FILE))
        with runtime.load(files, n_ctx=64) as model:
            logits = runtime.logits(model, probe["input_ids"].tolist())[-len(probe["logits"]):]
        # Same up to kernel and half-precision rounding: logits within 0.1 (they span about +-8), same top-1.
        np.testing.assert_allclose(logits, probe["logits"], atol=0.1)
        assert (logits.argmax(-1) == probe["logits"].argmax(-1)).all()
        shards = sorted(p.name for p in files.glob("*.safetensors") if p.name != C.PROBE_FILE)
        sharded = o.recipe == "awq_w4a16" and o in first or o.recipe == "gptq_w4a16" and o in second
        assert (len(shards) > 1) == sharded, (o.spec_id, shards)
        assert (files / "model.safetensors.index.json").is_file() == sharded
        assert store.verify(o.key) == []
        checked += 1
    assert checked == 4


@pytest.mark.slow
def test_quantizer_processes_import_their_libraries_ahead_of_their_steps(calibrated_runs):
    """Embedded, each torch quantization's child was started when the run began (one per backend, the next
    started as the previous is handed its step): the step waited at most for the rest of that import."""
    root, first, second = calibrated_runs
    for o in (*first, *second):
        if o.step == C.QUANTIZE:
            phases = o.result["phases_s"]
            assert phases["imported_ahead"] > 0.5, (o.spec_id, phases)  # torch + the library, before the step
            assert phases["imports"] < 0.5, (o.spec_id, phases)  # nothing imported again after the request
            assert phases["start"] < phases["imported_ahead"] + 1.0, (o.spec_id, phases)
            assert phases["child_process"] >= phases["oneshot" if "oneshot" in phases else "quantize"]


def test_children_started_ahead_and_not_needed_are_stopped(tmp_path):
    from quantmill.backends import QUANTIZERS
    from quantmill.backends.calibrated import prestarted

    bnb, llmc = QUANTIZERS.get("bitsandbytes"), QUANTIZERS.get("llmcompressor")
    with prestarted([bnb, llmc, QUANTIZERS.get("gguf")]) as ahead:  # gguf has no child to start
        children = dict(ahead.children)
        assert sorted(children) == ["bitsandbytes", "llmcompressor"]
        assert all(c.poll() is None for c in children.values())
        ahead.expect([bnb])  # the plan: only the bitsandbytes recipe has a step to run
        assert children["llmcompressor"].poll() is not None and children["bitsandbytes"].poll() is None
    assert children["bitsandbytes"].poll() is not None and ahead.children == {} and ahead.expected == {}


@pytest.mark.slow
def test_bitsandbytes_nf4_runs_on_cpu(tmp_path):
    from quantmill.prefect.launch import run_config

    pytest.importorskip("bitsandbytes")
    outcomes = run_config(compose_in(tmp_path, "recipe=[bnb_nf4]", "validate.n_chunks=2", "publish.enabled=false"))
    by_id = {o.spec_id: o for o in outcomes}
    assert by_id["validate:bnb_nf4"].result["status"] == "passed", by_id["validate:bnb_nf4"].result
    assert by_id["quantize:bnb_nf4"].result["scheme"] == "NF4"
    assert "calibrate:dataset" not in by_id  # data-free


def test_one_calibration_set_serves_gguf_and_torch_recipes(tmp_path):
    cfg = compose_in(tmp_path, "recipe=[gguf_q4_k_m,gptq_w4a16,awq_w4a16]")
    specs = plan(cfg, open_store(cfg.store)).specs
    assert [s for s in specs if s.startswith("calibrate:dataset")] == ["calibrate:dataset"]
    assert specs["quantize:gptq_w4a16"].inputs["calibration"] == "calibrate:dataset"
    assert specs["quantize:awq_w4a16"].inputs["calibration"] == "calibrate:dataset"
    assert specs["calibrate:imatrix-gguf"].inputs["calibration"] == "calibrate:dataset"
    # torch formats share the source checkpoint's reference logits
    assert specs["validate:gptq_w4a16"].inputs["reference"] == "validate:reference-safetensors"


def _preflight(tmp_path, *overrides):
    cfg = compose_in(tmp_path, *overrides)
    with pytest.raises(PreflightError) as e:
        plan(cfg, open_store(cfg.store))
    message = str(e.value)
    assert "\n" not in message
    assert not (tmp_path / "store" / C.OBJECTS_DIR).exists() or not any((tmp_path / "store" / C.OBJECTS_DIR).iterdir())
    return message


def test_unknown_scheme_lists_the_valid_ones(tmp_path):
    message = _preflight(tmp_path, "recipe=[gptq_w4a16]", "recipe.gptq_w4a16.quant_type=W5A16")
    assert "scheme 'W5A16' unknown to llmcompressor gptq" in message
    assert "valid: W4A16, W4A16_ASYM, W8A16, W8A8, W4A8" in message
    message = _preflight(tmp_path, "recipe=[gptq_w4a16]", "recipe.gptq_w4a16.backend=gptqmodel",
                         "recipe.gptq_w4a16.quant_type=FP8")
    assert "valid: W2A16, W3A16, W4A16, W8A16" in message


def test_group_size_must_divide_the_hidden_size(tmp_path):
    message = _preflight(tmp_path, "recipe=[awq_w4a16]", "recipe.awq_w4a16.params.group_size=96")
    assert "group_size 96 does not divide" in message and "hidden_size 256" in message


def test_shard_size_must_be_a_size(tmp_path):
    message = _preflight(tmp_path, "recipe=[gptq_w4a16]", "recipe.gptq_w4a16.params.max_shard_size=1.5GB")
    assert message == ("recipe 'gptq_w4a16': max_shard_size '1.5GB' is not a size; write bytes or digits and a unit "
                       "(GB, MB, KB, GiB, MiB, KiB), e.g. 1GB")


def test_backend_that_cannot_run_the_method(tmp_path):
    message = _preflight(tmp_path, "recipe=[fp8_dynamic]", "recipe.fp8_dynamic.backend=gptqmodel",
                         "recipe.fp8_dynamic.requires.device=any")
    assert "method 'fp8' unknown to backend 'gptqmodel'; it runs: gptq, awq" in message


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_recipe_on_a_machine_without_cuda_stops_in_preflight(tmp_path):
    message = _preflight(tmp_path, "recipe=[fp8_dynamic,gguf_q8_0]")
    assert message.startswith("recipe 'fp8_dynamic' needs a CUDA GPU (compute capability >= 8.9, >= 16 GiB); "
                              "this machine has none")
    assert "pool offering 'cuda'" in message


def test_fewer_calibration_samples_than_requested_warns_with_the_numbers(tmp_path, caplog):
    from quantmill.backends.local_source import BUNDLED_ROOT
    from quantmill.config import CalibrationConfig
    from quantmill.plan.preflight import BUNDLED_TEXT
    from quantmill.plan.records import CalibrationSetRecord
    from quantmill.steps.calibrate import calibrate_dataset

    def record(**settings):
        return CalibrationSetRecord.from_config(CalibrationConfig(**settings), texts=[])

    files = [BUNDLED_TEXT / "calibration.txt"]
    out = tmp_path / "cal"
    out.mkdir()
    with caplog.at_level(logging.WARNING):
        result = calibrate_dataset(record(num_samples=100000, seq_len=256, min_samples=8),
                                   BUNDLED_ROOT / "tiny-llama", files, out)
    assert 8 <= result["samples"] < 100000
    assert f"{result['samples']} of 100000 requested windows of 256 tokens" in caplog.text
    with pytest.raises(PreflightError, match=r"below calibration.min_samples=100000"):
        calibrate_dataset(record(num_samples=100000, seq_len=256, min_samples=100000),
                          BUNDLED_ROOT / "tiny-llama", files, out)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_out_of_gpu_memory_names_the_layer(tmp_path, monkeypatch):
    """A real CUDA OOM: the quantizer process may use so little of the GPU that calibration cannot fit."""
    from quantmill.prefect.launch import run_config

    monkeypatch.setenv("QUANTMILL_CUDA_MEMORY_FRACTION", "0.00002")
    outcomes = run_config(compose_in(tmp_path, "recipe=[gptq_w4a16]", "publish.enabled=false",
                                     "validate.enabled=false"))
    failed = [o for o in outcomes if o.spec_id == "quantize:gptq_w4a16"][0]
    assert failed.status == "failed" and "out of GPU memory in" in failed.error
    assert "lower calibration.num_samples or calibration.seq_len" in failed.error


@pytest.mark.parametrize("scheme", ["W4A16", "FP8_DYNAMIC"])
def test_compressing_each_module_after_its_probe_forward_saves_the_same_bytes(tmp_path, scheme):
    """The probe compresses each quantized module right after its forward (on a GPU, while its weights are still
    there); the compressed save then skips it. Every file saved so equals the one the save's own compression
    writes, and the probe's logits are the same."""
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from quantmill.backends.llmcompressor_quantizer import probe_then_compress
    from quantmill.backends.local_source import BUNDLED_ROOT
    from quantmill.backends.quantizer_process import write_probe

    ids = [list(range(3, 67))]

    def quantized():
        model = AutoModelForCausalLM.from_pretrained(BUNDLED_ROOT / "tiny-llama", dtype="auto")
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
        return model

    saved_only, fused = tmp_path / "saved-only", tmp_path / "fused"
    for out in (saved_only, fused):
        out.mkdir()
    model = quantized()
    write_probe(model, saved_only, ids)
    model.save_pretrained(saved_only, save_compressed=True)

    model = quantized()
    with probe_then_compress(model):
        write_probe(model, fused, ids)
    layers = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    assert len(layers) == 14 and {m.quantization_status for m in layers} == {QuantizationStatus.COMPRESSED}
    model.save_pretrained(fused, save_compressed=True)

    names = sorted(p.name for p in saved_only.iterdir())
    assert names == sorted(p.name for p in fused.iterdir()) and "model.safetensors" in names
    assert {n: (fused / n).read_bytes() == (saved_only / n).read_bytes() for n in names} == {n: True for n in names}
    assert np.array_equal(load_file(str(fused / C.PROBE_FILE))["logits"],
                          load_file(str(saved_only / C.PROBE_FILE))["logits"])


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_probe_is_what_the_saved_checkpoint_computes(tmp_path):
    """FP8 keeps the unquantized weight and quantizes it in the forward. After ``oneshot`` on a GPU the weights
    stay offloaded, and a probe that let the module's forward copy the stored weight again recorded the unquantized
    model's logits: here they must be the reloaded checkpoint's, far closer to it than the source's. (NVFP4 is not
    compared so: on a GPU without FP4 kernels its checkpoint reloads emulated in bfloat16, and its 4-bit
    activations round differently there than in the float32 probe.)"""
    from safetensors.numpy import load_file

    from quantmill.backends import RUNTIMES
    from quantmill.backends.local_source import BUNDLED_ROOT
    from quantmill.prefect.launch import run_config

    cfg = compose_in(tmp_path, "recipe=[fp8_dynamic]", "publish.enabled=false", "validate.enabled=false")
    outcomes = run_config(cfg)
    assert all(o.ok for o in outcomes), [(o.spec_id, o.error) for o in outcomes if not o.ok]
    store, runtime = open_store(cfg.store), RUNTIMES.get("transformers")
    quantized = next(o for o in outcomes if o.step == C.QUANTIZE)
    files = store.files(store.lookup(quantized.key))
    probe = load_file(str(files / C.PROBE_FILE))
    ids = probe["input_ids"].tolist()
    with runtime.load(files, n_ctx=64) as model:
        reloaded = runtime.logits(model, ids)[-len(probe["logits"]):]
    with runtime.load(BUNDLED_ROOT / "tiny-llama", n_ctx=64) as model:
        source = runtime.logits(model, ids)[-len(probe["logits"]):]
    quantization_effect = np.abs(source - reloaded).max()
    difference = np.abs(probe["logits"] - reloaded).max()
    assert quantization_effect > 0.01, quantization_effect
    assert difference < 0.25 * quantization_effect, (difference, quantization_effect)


def _legacy_python():
    from quantmill.backends.legacy_quantizer import legacy_python

    python = legacy_python()
    if not python.is_file():
        pytest.skip(f"no legacy environment at {python} (make test creates it with scripts/make-legacy-env.sh)")
    return python


@pytest.mark.slow
def test_autoawq_runs_in_its_own_environment_and_records_it(tmp_path):
    """AutoAWQ (archived, transformers 4.x) quantizes in its environment; the main one (transformers 5) validates."""
    import transformers

    from quantmill.prefect.launch import run_config

    _legacy_python()
    outcomes = run_config(compose_in(tmp_path, "recipe=[awq_w4a16]", "recipe.awq_w4a16.backend=autoawq",
                                     "validate.n_chunks=2", "publish.enabled=false"))
    by_id = {o.spec_id: o for o in outcomes}
    assert by_id["validate:awq_w4a16"].result["status"] == "passed", by_id["validate:awq_w4a16"].result
    store = open_store(compose_in(tmp_path, "recipe=[awq_w4a16]").store)
    statement = json.loads((store.root / C.OBJECTS_DIR / by_id["quantize:awq_w4a16"].key /
                            C.PROVENANCE_FILE).read_text())
    tools = {d["name"].removeprefix("tool:"): d["annotations"]["version"]
             for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]
             if d["name"].startswith("tool:")}
    assert tools["legacy-env:autoawq"] == "0.2.9"
    assert tools["legacy-env:transformers"].startswith("4.") and transformers.__version__.startswith("5.")


def test_legacy_backend_without_its_environment_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTMILL_LEGACY_PYTHON", str(tmp_path / "nowhere" / "python"))
    message = _preflight(tmp_path, "recipe=[awq_w4a16]", "recipe.awq_w4a16.backend=autoawq")
    assert "runs in an environment of its own" in message and "scripts/make-legacy-env.sh autoawq" in message


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_autogptq_says_exactly_why_it_cannot_run_here(tmp_path, monkeypatch):
    from quantmill.backends import legacy_quantizer

    python = tmp_path / "legacy-python"
    python.write_text("")
    monkeypatch.setenv("QUANTMILL_LEGACY_PYTHON", str(python))
    monkeypatch.setattr(legacy_quantizer, "_versions", lambda p, pkgs: {"auto-gptq": "0.7.1"})
    message = _preflight(tmp_path, "recipe=[gptq_w4a16]", "recipe.gptq_w4a16.backend=autogptq",
                         "recipe.gptq_w4a16.params.group_size=128")
    assert "AutoGPTQ 0.7.1 refuses to quantize without a CUDA device" in message


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """The bundled model in FP8 with one weight scale per output channel (FP8_DYNAMIC) and per 128x128 block
    (FP8_BLOCK), as llm-compressor writes them (data-free, so no calibration set)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmill.backends.local_source import BUNDLED_ROOT

    root = tmp_path_factory.mktemp("fp8")
    source = BUNDLED_ROOT / "tiny-llama"
    for scheme in ("FP8_DYNAMIC", "FP8_BLOCK"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])])
        model.save_pretrained(root / scheme, save_compressed=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(root / scheme)
    return root


def test_fp8_kernels_take_channel_scaled_fp8_and_leave_block_scales_to_compressed_tensors(fp8_checkpoints,
                                                                                           calibrated_runs):
    from quantmill.backends.transformers_runtime import TransformersRuntime, fp8_kernels

    assert fp8_kernels(fp8_checkpoints / "FP8_DYNAMIC")
    assert not fp8_kernels(fp8_checkpoints / "FP8_BLOCK")  # transformers' FP8 linear holds one scale a row
    static = fp8_checkpoints / "static"  # the same with a calibrated input scale, which that layer would not use
    static.mkdir(exist_ok=True)
    config = json.loads((fp8_checkpoints / "FP8_DYNAMIC" / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"].update(dynamic=False, strategy="tensor")
    (static / "config.json").write_text(json.dumps(config))
    assert not fp8_kernels(static)
    store = open_store(compose_in(calibrated_runs[0]).store)
    entry = json.loads((calibrated_runs[0] / "store" / C.REGISTRY_DIR / "tiny-llama-gptq_w4a16" / "v1" /
                        C.REGISTRY_ENTRY_FILE).read_text())
    assert not fp8_kernels(store.files(store.lookup(entry["artifact"]["key"])))
    with TransformersRuntime().load(fp8_checkpoints / "FP8_DYNAMIC", n_ctx=64) as model:  # CPU: no FP8 matmul
        assert TransformersRuntime().held_as(model) == "emulated: float-quantized weights decompressed on CPU"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_fp8_runs_in_fp8_kernels_and_computes_what_compressed_tensors_emulates(fp8_checkpoints):
    """On compute capability 8.9+ an FP8_DYNAMIC checkpoint runs in transformers' FP8 linear layers; their logits
    are the emulated route's (bfloat16 weights, activations rounded to FP8 in eager code) within a small part of
    what quantization itself moves them by."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantmill.backends.local_source import BUNDLED_ROOT
    from quantmill.backends.transformers_runtime import TransformersRuntime

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmul needs compute capability 8.9")
    runtime, ids = TransformersRuntime(), list(range(5, 69))
    with runtime.load(fp8_checkpoints / "FP8_DYNAMIC", n_ctx=64) as model:
        kernels = runtime.logits(model, ids)
        assert runtime.held_as(model).startswith("native: 14 linear layers in FP8 kernels")
    emulated_model = AutoModelForCausalLM.from_pretrained(fp8_checkpoints / "FP8_DYNAMIC", dtype="auto",
                                                          device_map="cuda")
    with torch.inference_mode():
        emulated = emulated_model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
    with runtime.load(BUNDLED_ROOT / "tiny-llama", n_ctx=64) as model:
        source = runtime.logits(model, ids)
    effect = np.abs(source - emulated).max()
    assert effect > 0.01, effect
    assert np.abs(kernels - emulated).max() < 0.5 * effect
