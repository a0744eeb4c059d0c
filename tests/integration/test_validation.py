"""Validation against the unquantized model, cross-checked with llama.cpp's own llama-perplexity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from quantmill import constants as C
from quantmill.backends.llamacpp_runtime import LlamaCppRuntime
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.cli import main
from quantmill.evaluation import anchors
from quantmill.outcome import RAN
from quantmill.plan.build import plan
from quantmill.prefect.launch import run_config
from quantmill.steps import validate
from quantmill.store import open_store
from tests.conftest import compose_in, overrides_for, plant, run_inline

pytestmark = pytest.mark.slow
EVAL_TEXT = BUNDLED_ROOT.parent / "bundled" / "text" / "eval.txt"
RECIPES = "recipe=[gguf_q8_0,gguf_q6_k,gguf_q4_k_m]"


@pytest.fixture(scope="module")
def three_quants(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    cfg = compose_in(root, RECIPES, "validate.offload_curve=true")
    outcomes = {o.spec_id: o for o in run_config(cfg)}
    return root, cfg, outcomes


def _files(root, outcome):
    store = open_store(compose_in(root).store)
    return store, store.files(store.lookup(outcome.key))


def test_reference_is_computed_once_for_three_quants(three_quants):
    root, cfg, outcomes = three_quants
    the_plan = plan(cfg, open_store(cfg.store))
    references = [s for s in the_plan if s.step == C.VALIDATE and s.config.get("kind") == "reference"]
    assert [s.id for s in references] == ["validate:reference-gguf"]
    for recipe in ("gguf_q8_0", "gguf_q6_k", "gguf_q4_k_m"):
        assert the_plan.specs[f"validate:{recipe}"].inputs["reference"] == "validate:reference-gguf"
    assert outcomes["validate:reference-gguf"].status == RAN
    store = open_store(cfg.store)
    made = [json.loads((d / C.PROVENANCE_FILE).read_text()) for d in (store.root / C.OBJECTS_DIR).iterdir()]
    specs = [s["predicate"]["buildDefinition"]["externalParameters"]["spec"] for s in made]
    assert specs.count("validate:reference-gguf") == 1 and specs.count("validate:gguf_q4_k_m") == 1


def test_metrics_are_measured_ordered_and_gated(three_quants):
    root, _, outcomes = three_quants
    records = {}
    for recipe in ("gguf_q8_0", "gguf_q6_k", "gguf_q4_k_m"):
        _, files = _files(root, outcomes[f"validate:{recipe}"])
        records[recipe] = json.loads((files / C.VALIDATION_FILE).read_text())
    for recipe, r in records.items():
        assert r["status"] == C.PASSED, (recipe, validate.failed_checks(r))
        assert r["tokenizer"]["exact"] and r["tokenizer"]["probes"] == 7
        assert r["scored_tokens"] == 8 * 127
        assert 0 < r["mean_kld"] <= r["p99_kld"] <= r["max_kld"]
        assert r["peak_rss_bytes"] > 10 << 20 and r["prompt_tokens_per_second"] > 0
        assert {c["name"] for c in r["checks"]} >= {"loads", "generates", "max_mean_kld", "tokenizer_exact"}
    # more bits, closer to the reference
    assert records["gguf_q8_0"]["mean_kld"] < records["gguf_q6_k"]["mean_kld"] < records["gguf_q4_k_m"]["mean_kld"]
    assert records["gguf_q8_0"]["top1_agreement"] >= records["gguf_q4_k_m"]["top1_agreement"]
    assert abs(records["gguf_q8_0"]["ppl_ratio"] - 1) < 0.01
    card = LocalRegistry(root / "store" / C.REGISTRY_DIR).card("tiny-llama-gguf_q4_k_m", 1)
    assert "| KL divergence | mean " in card and "| Tokenizer fidelity | 7 probes" in card


def test_agreement_with_llama_perplexity(three_quants, tmp_path):
    """Same text, context length and base (the F16 GGUF): quantmill's numbers within 1 % of llama.cpp's."""
    root, _, outcomes = three_quants
    store = open_store(compose_in(root).store)
    f16 = store.files(store.lookup(outcomes["convert:gguf-f16"].key))
    base = tmp_path / "base.dat"
    anchors.write_base(f16 / C.GGUF_F16_FILE, EVAL_TEXT, base, n_ctx=256, chunks=8)
    anchors.evalset_from_base(base, tmp_path / "evalset", bos=1, eos=2, prompt_ids=[1, 450])
    runtime = LlamaCppRuntime()
    (tmp_path / "reference").mkdir()
    validate.reference(runtime, f16, tmp_path / "evalset", tmp_path / "reference", threads=0)
    rows = []
    for recipe in ("gguf_q8_0", "gguf_q4_k_m"):
        quant = store.files(store.lookup(outcomes[f"quantize:{recipe}"].key))
        ours = validate.validate(runtime, quant, tmp_path / "evalset", tmp_path / "reference", gates={},
                                 max_tokens=4, threads=0, label=recipe)
        theirs = anchors.kl_divergence(runtime.model_file(quant), base, n_ctx=256)
        rows.append((recipe, ours, theirs))
        print(f"{recipe}: mean KLD {ours['mean_kld']:.6f} (llama.cpp {theirs['mean_kld']:.6f}), "
              f"PPL {ours['ppl']:.4f} ({theirs['ppl']:.4f}), p99 KLD {ours['p99_kld']:.5f} ({theirs['p99_kld']:.5f}), "
              f"top-1 {ours['top1_agreement']:.4f} ({theirs['top1_agreement']:.4f})")
    for recipe, ours, theirs in rows:
        assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=0.01), recipe
        assert ours["top1_agreement"] == pytest.approx(theirs["top1_agreement"], abs=0.01), recipe
    # Against quantmill's exact float reference, KL divergence agrees within 1 %, or within the last digit
    # llama.cpp prints (6 decimals: at Q8_0's ~6e-5 nats that digit is itself 0.8 %).
    for recipe, ours, theirs in rows:
        assert abs(ours["mean_kld"] - theirs["mean_kld"]) <= max(0.01 * theirs["mean_kld"], 5e-7), recipe

    # Same base log-probs as llama.cpp (its 16-bit base file, its -16 cutoff): the arithmetic is identical.
    from quantmill.evaluation import metrics

    _, _, tokens = anchors.read_base_tokens(base)
    base_logp = anchors.read_base_logprobs(base)
    for recipe, _, theirs in rows:
        quant = store.files(store.lookup(outcomes[f"quantize:{recipe}"].key))
        with runtime.load(quant, n_ctx=256) as model:
            kld = np.concatenate([
                anchors.llamacpp_kld(base_logp[i], metrics.scored_logprobs(
                    runtime.logits(model, metrics.window_input(window, 1)), 256))
                for i, window in enumerate(tokens)])
        print(f"{recipe}: mean KLD on llama.cpp's base {kld.mean():.7f} (llama.cpp prints {theirs['mean_kld']:.6f})")
        # within 1 %, or within the last printed digit (llama.cpp prints 6 decimals)
        assert abs(kld.mean() - theirs["mean_kld"]) <= max(0.01 * theirs["mean_kld"], 5e-7), recipe


def _zero_scales(path, tensor_name):
    """Zero the super-block scales (d, dmin: the first 4 bytes of every 144-byte Q4_K block) of one tensor."""
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == tensor_name)
    assert tensor.tensor_type.name == "Q4_K"
    with open(path, "r+b") as f:
        for block in range(int(tensor.n_bytes) // 144):
            f.seek(tensor.data_offset + 144 * block)
            f.write(b"\0\0\0\0")


def _swap_tokens(path, probe_text):
    """Swap two equal-length pieces in the GGUF's vocabulary, one of them used by ``probe_text``."""
    from gguf import GGUFReader

    runtime = LlamaCppRuntime()
    with runtime.load(path.parent, n_ctx=64) as model:
        used = runtime.tokenize(model, probe_text)
    reader = GGUFReader(path, "r+")
    field = reader.fields["tokenizer.ggml.tokens"]
    parts = [field.parts[i] for i in field.data]
    a = next(i for i in used if len(parts[i]) >= 3)
    b = next(i for i in range(len(parts)) if i not in used and i > 258 and len(parts[i]) == len(parts[a]))
    saved = np.array(parts[a])
    parts[a][:] = parts[b]
    parts[b][:] = saved
    reader.data.flush()


@pytest.mark.parametrize("damage, recipe, gate", [
    ("zero_scales", "gguf_q4_k_m", "max_mean_kld"),
    ("swap_tokens", "gguf_q8_0", "tokenizer_exact"),
])
def test_planted_broken_quant_fails_its_gate_and_is_not_published(tmp_path, damage, recipe, gate):
    store, _, results = run_inline(compose_in(tmp_path, f"recipe=[{recipe}]", "validate.enabled=false",
                                              "publish.enabled=false"))
    good = results[f"quantize:{recipe}"].ref
    broken = tmp_path / "broken"
    shutil.copytree(store.files(good), broken)
    gguf = next(broken.glob("*.gguf"))
    if damage == "zero_scales":
        _zero_scales(gguf, "blk.1.ffn_up.weight")
    else:
        _swap_tokens(gguf, "The quick brown fox jumps over the lazy dog.")
    plant(store, good.key, broken)

    outcomes = {o.spec_id: o for o in run_config(compose_in(tmp_path, f"recipe=[{recipe}]"))}
    v = outcomes[f"validate:{recipe}"]
    assert v.status == RAN and v.result["status"] == C.FAILED
    assert any(f.startswith(gate) for f in v.result["failed"]), v.result["failed"]
    assert outcomes[f"publish:{recipe}"].status == "failed"
    assert f"failed validation: {gate}" in outcomes[f"publish:{recipe}"].error
    assert LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).names() == []
    record = json.loads((store.files(store.lookup(v.key)) / C.VALIDATION_FILE).read_text())
    assert record["status"] == C.FAILED  # kept in the store with its report
    report = json.loads((tmp_path / "store" / "reports" / "tiny-llama" / "report.json").read_text())
    assert [r["status"] for r in report["artifacts"]] == [C.FAILED]
    if gate == "max_mean_kld":  # forced: published, marked unvalidated everywhere it shows
        from quantmill.cli import main

        assert main(["run", "--force", f"recipe=[{recipe}]", *overrides_for(tmp_path)]) == 1  # a gate still failed
        entry = LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).get(f"tiny-llama-{recipe}")
        assert entry["validated"] is False and entry["validation"] == {"status": C.FAILED}
        assert "**Unvalidated**" in LocalRegistry(tmp_path / "store" / C.REGISTRY_DIR).card(entry["name"], 1)
        assert '<span class="unvalidated">unvalidated</span>' in \
            (tmp_path / "store" / C.REGISTRY_DIR / "index.html").read_text()


def test_quality_metrics_are_reproducible(tmp_path):
    keys = ("ppl", "ref_ppl", "mean_kld", "p99_kld", "top1_agreement", "generated_ids")
    runs = []
    for name in ("a", "b"):
        store, _, results = run_inline(compose_in(tmp_path / name, "recipe=[gguf_q4_k_m]"))
        record = json.loads((store.files(results["validate:gguf_q4_k_m"].ref) / C.VALIDATION_FILE).read_text())
        runs.append(({k: record[k] for k in keys}, results["quantize:gguf_q4_k_m"].ref.digest,
                     results["validate:reference-gguf"].ref.digest))
    assert runs[0] == runs[1]


def test_report_lists_every_artifact_with_a_chart(three_quants, capsys):
    root, _, _ = three_quants
    html = (root / "store" / "reports" / "tiny-llama" / "report.html").read_text()
    assert html.count('<circle class="point"') == 3 and "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert main(["report", "--json", *overrides_for(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(r["recipe"] for r in report["artifacts"]) == ["gguf_q4_k_m", "gguf_q6_k", "gguf_q8_0"]
    assert all(r["status"] == C.PASSED for r in report["artifacts"])


def test_a_failing_gate_is_one_line_naming_the_gate_and_margin(tmp_path):
    """A normal outcome, not a crash: exit 1, the table on stdout, one line on stderr, no traceback."""
    import os
    import subprocess
    import sys

    from tests.conftest import CONF, overrides_for

    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"}
    env.pop("QUANTMILL_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", *overrides_for(tmp_path),
                           "recipe=[gguf_q8_0]", "recipe.gguf_q8_0.gates.max_mean_kld=0.000001"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("quantmill: error:")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert len(errors) == 1 and "publish:gguf_q8_0" in errors[0] and "max_mean_kld" in errors[0], done.stderr
    assert "> 1e-06 (by " in errors[0], errors[0]
    assert not [line for line in done.stderr.splitlines() if line.startswith(("ERROR", "WARNING"))], done.stderr


def test_a_run_from_inside_another_checkout_uses_the_installed_code_in_every_process(tmp_path):
    """The `quantmill` command started in a directory that holds another `quantmill/` package: the evaluation
    processes import the same quantmill as the run (``python -m`` would put the working directory first)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import CONF, overrides_for

    other = tmp_path / "quantmill"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('the other checkout was imported')\n")
    (other / "evaluation").mkdir()
    (other / "evaluation" / "__init__.py").write_text("")
    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "quantmill"), "run", "--json", *overrides_for(tmp_path),
                           "recipe=[gguf_q8_0]", "publish.enabled=false"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the other checkout was imported" not in done.stdout + done.stderr


def test_the_offload_curve_is_measured_on_a_cuda_build_and_explained_elsewhere(three_quants):
    """validate.offload_curve: generation speed with all, 3/4, 1/2, 1/4 and none of the layers on the GPU. A CPU
    build of llama.cpp has no GPU to offload to: the record says so and names where it can be measured."""
    from quantmill.toolchain.llamacpp import locate

    root, cfg, outcomes = three_quants
    store, files = _files(root, outcomes["validate:gguf_q4_k_m"])
    curve = json.loads((files / C.VALIDATION_FILE).read_text())["offload_curve"]
    card = LocalRegistry(root / "store" / C.REGISTRY_DIR).card("tiny-llama-gguf_q4_k_m", 1)
    if not locate().cuda:
        assert curve == {"available": False, "detail": "not measured: llama.cpp here is built without CUDA; validate "
                                                       "on a worker of a pool offering capability 'llamacpp-cuda'"}
        assert "| Layers on the GPU | not measured: llama.cpp here is built without CUDA" in card
        return
    layers = [p["gpu_layers"] for p in curve["points"]]
    assert layers == [3, 1, 1, 0, 0]  # the bundled model has 2 blocks, and the output layer
    speeds = [p["generation_tokens_per_second"] for p in curve["points"]]
    assert curve["available"] and speeds[0] > 0 and curve["points"][0]["vs_all_on_gpu"] == 1.0
    report = (root / "store" / "reports" / "tiny-llama" / "report.html").read_text()
    assert "<h2>Layers on the GPU</h2>" in report
