"""Task accuracy: lm-evaluation-harness tasks over local data files, run on the unquantized model once and on each
artifact in its own runtime, beside each other in the record, the card and the report, with a gate on recovery."""

from __future__ import annotations

import json

import pytest

from quantmill import constants as C
from quantmill.backends.local_publisher import LocalRegistry
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.errors import PreflightError
from quantmill.outcome import RAN
from quantmill.plan.preflight import BUNDLED_TEXT
from quantmill.prefect.launch import run_config
from quantmill.store import open_store
from tests.conftest import compose_in

pytest.importorskip("lm_eval")
TASK = "validate.tasks=[bundled:quantmill_cloze.yaml]"


@pytest.fixture(scope="module")
def with_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    # Q2_K keeps this model's multiple-choice accuracy; a recovery above 1 cannot be met, so its gate must fail.
    outcomes = {o.spec_id: o for o in run_config(compose_in(
        root, "recipe=[gguf_q8_0,gguf_q2_k]", TASK, "validate.flip_prompts=0",
        "+recipe.gguf_q2_k.gates.min_task_recovery=1.01"))}
    return root, outcomes


def test_accuracy_of_the_original_and_each_quant_side_by_side(with_tasks):
    root, outcomes = with_tasks
    references = [s for s, o in outcomes.items() if s.startswith("validate:reference-") and o.status == RAN]
    assert references == ["validate:reference-gguf"]  # one pass of the tasks on the original, for every quant
    ref = outcomes["validate:reference-gguf"].result["tasks"]["quantmill_cloze"]
    assert ref["docs"] == 120 and ref["metric"] == "acc" and 0.5 < ref["value"] <= 1  # chance is 0.25
    for recipe in ("gguf_q8_0", "gguf_q2_k"):
        task = outcomes[f"validate:{recipe}"].result["tasks"]["quantmill_cloze"]
        assert task["reference"] == ref["value"] and task["docs"] == 120 and 0 < task["stderr"] < 0.1
        assert task["recovery"] == pytest.approx(task["value"] / ref["value"])
    q8 = outcomes["validate:gguf_q8_0"].result
    assert q8["status"] == C.PASSED and q8["task_recovery"] == pytest.approx(q8["tasks"]["quantmill_cloze"]["recovery"],
                                                                            abs=1e-4)
    card = LocalRegistry(root / "store" / C.REGISTRY_DIR).card("tiny-llama-gguf_q8_0", 1)
    value = q8["tasks"]["quantmill_cloze"]["value"]
    assert f"quantmill_cloze acc {value:.3f} ± " in card and f"(original {ref['value']:.3f}, recovery" in card
    report = (root / "store" / "reports" / "tiny-llama" / "report.html").read_text()
    assert "<h2>Task accuracy</h2>" in report and f"<td>{ref['value']:.3f}</td>" in report


def test_a_recovery_gate_refuses_and_nothing_is_published(with_tasks):
    root, outcomes = with_tasks
    q2 = outcomes["validate:gguf_q2_k"].result
    store = open_store(compose_in(root).store)
    record = json.loads((store.files(store.lookup(outcomes["validate:gguf_q2_k"].key)) / C.VALIDATION_FILE)
                        .read_text())
    (gate,) = [c for c in record["checks"] if c["name"] == "min_task_recovery"]
    assert not gate["passed"] and gate["value"] == q2["task_recovery"] < 1.01 and q2["status"] == C.FAILED
    assert q2["failed"] == [f"min_task_recovery (task_recovery {q2['task_recovery']:.5g} < 1.01 (by "
                            f"{1.01 - q2['task_recovery']:.3g}))"]
    assert LocalRegistry(root / "store" / C.REGISTRY_DIR).names() == ["tiny-llama-gguf_q8_0"]


def test_the_adapter_agrees_with_lm_evals_own_transformers_model(with_tasks, tmp_path):
    """The same task through lm-eval's own ``hf`` model on the source checkpoint: the F16 GGUF in llama.cpp, scored
    through quantmill's adapter, picks the same answers but for rounding on near ties."""
    import shutil

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root, outcomes = with_tasks
    for name in ("quantmill_cloze.yaml", "quantmill_cloze.jsonl"):
        shutil.copy(BUNDLED_TEXT / "tasks" / name, tmp_path / name)
    task = (tmp_path / "quantmill_cloze.yaml").read_text()
    (tmp_path / "quantmill_cloze.yaml").write_text(task.replace("test: quantmill_cloze.jsonl",
                                                                f"test: {tmp_path / 'quantmill_cloze.jsonl'}"))
    results = simple_evaluate(model="hf", model_args=f"pretrained={BUNDLED_ROOT / 'tiny-llama'},dtype=float32",
                              tasks=["quantmill_cloze"], task_manager=TaskManager(include_path=str(tmp_path),
                                                                                  include_defaults=False),
                              bootstrap_iters=0, log_samples=False, device="cpu")
    theirs = results["results"]["quantmill_cloze"]["acc,none"]
    ours = outcomes["validate:reference-gguf"].result["tasks"]["quantmill_cloze"]["value"]
    assert abs(ours - theirs) <= 2 / 120, (ours, theirs)


def _task_file(tmp_path, body: str, data: bool = True):
    if data:
        (tmp_path / "docs.jsonl").write_text('{"context": "a", "choices": [" b", " c"], "label": 0}\n')
    (tmp_path / "t.yaml").write_text(body)
    return tmp_path / "t.yaml"


@pytest.mark.parametrize("body, data, message", [
    ("task: t\ndataset_path: cais/mmlu\n", True, "reads dataset_path 'cais/mmlu', not a local data file; set "
                                                 "dataset_path: json"),
    ("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\n", False,
     "data file 'docs.jsonl' of split 'test' not found"),
    ("task: t\ndataset_path: json\nprocess_docs: !function utils.process\n", True, "it calls Python code (!function)"),
    ("dataset_path: json\n", True, "has no 'task:' name"),
])
def test_bad_task_files_are_one_line_before_work(tmp_path, body, data, message):
    from quantmill.plan.build import plan

    path = _task_file(tmp_path, body, data)
    cfg = compose_in(tmp_path, "recipe=[gguf_q8_0]", f"validate.tasks=[{path}]")
    with pytest.raises(PreflightError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        plan(cfg, open_store(cfg.store))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "store" / "objects").exists() or not any((tmp_path / "store" / "objects").iterdir())


def test_a_recovery_gate_without_tasks_is_refused(tmp_path):
    from quantmill.plan.build import plan

    cfg = compose_in(tmp_path, "recipe=[gguf_q8_0]", "+recipe.gguf_q8_0.gates.min_task_recovery=0.9")
    with pytest.raises(PreflightError, match="min_task_recovery but validate.tasks is empty"):
        plan(cfg, open_store(cfg.store))


def test_the_bundled_task_is_what_its_generator_writes(tmp_path):
    from quantmill.bundled.tasks import write

    for made in write(tmp_path):
        for suffix in (".yaml", ".jsonl"):
            name = made.with_suffix(suffix).name
            assert (tmp_path / name).read_bytes() == (BUNDLED_TEXT / "tasks" / name).read_bytes()
    docs = [json.loads(line) for line in (BUNDLED_TEXT / "tasks" / "quantmill_cloze.jsonl").read_text().splitlines()]
    assert len(docs) == 120 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in docs)


def test_generative_and_rolling_requests_are_cut_to_the_window(with_tasks):
    """lm-eval's other two requests through the adapter, in llama.cpp on the F16 GGUF: a context three windows long
    with a generation as long as the window is cut to fit (the context keeps its end) instead of failing, and the
    rolling log-likelihood of that text is the sum over windows of a finite, negative score."""
    from types import SimpleNamespace

    import numpy as np

    from quantmill.backends import RUNTIMES
    from quantmill.evaluation.tasks import RuntimeLM

    root, outcomes = with_tasks
    store = open_store(compose_in(root).store)
    f16 = store.files(store.lookup(outcomes["convert:gguf-f16"].key))
    text = (BUNDLED_TEXT / "eval.txt").read_text()[:2000]
    runtime = RUNTIMES.get("llamacpp")
    with runtime.load(f16, n_ctx=64) as model:
        lm = RuntimeLM(runtime, model, 64)
        assert len(lm._ids(text)) > 3 * 64
        [generated] = lm.generate_until([SimpleNamespace(args=(text, {"until": ["\n\n"], "max_gen_toks": 64}))])
        [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
        tail = lm._ids(text)[-1:]
        # all but one position went to the generation: the same greedy continuation of the context's last token
        assert generated == runtime.detokenize(model, runtime.generate(model, tail, 63)).split("\n\n")[0]
    assert generated and np.isfinite(rolling) and rolling < 0
