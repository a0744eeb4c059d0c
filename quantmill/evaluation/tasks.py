"""Task accuracy through lm-evaluation-harness (``lm-eval``), on the artifact in its own runtime.

The harness asks a model three things: the log-likelihood of a continuation after a context, the rolling
log-likelihood of a text, and a generation up to stop strings. ``RuntimeLM`` answers them with the runtime quantmill
validates the artifact in (llama.cpp, MLX, ONNX Runtime, transformers), its tokenizer and its logits, so a task's
accuracy is what users of that file get. Tasks are YAML files with local data files (``dataset_path: json``), copied
into the evaluation set; they run offline, with the harness's own metrics and standard errors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TASKS_DIR = "tasks"  # inside the evaluation set: the task YAML files and their data files
TASK_RESULTS = "tasks.json"  # inside the reference: the unquantized model's task metrics


def task_names(files: Sequence[Path]) -> list[str]:
    import yaml

    return [yaml.safe_load(f.read_text())["task"] for f in files if f.suffix in (".yaml", ".yml")]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class RuntimeLM:
    """An lm-eval ``LM`` over one loaded artifact (built by ``make_lm``: lm-eval is imported only when tasks run)."""

    def __init__(self, runtime: Any, model: Any, n_ctx: int):
        self.runtime, self.model, self.n_ctx = runtime, model, n_ctx
        self.bos = runtime.special_ids(model)["bos"]

    def _ids(self, text: str) -> list[int]:
        return self.runtime.tokenize(self.model, text) if text else []

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of the continuation's log-probabilities after the context, and whether greedy decoding yields it."""
        ids = ([self.bos] if self.bos is not None else []) + context + continuation
        ids = ids[-(self.n_ctx + 1):]  # the window's end: the continuation and as much context as fits
        logp = _log_softmax(np.asarray(self.runtime.logits(self.model, ids[:-1]), dtype=np.float64))
        n = len(continuation)
        rows, targets = logp[-n:], np.asarray(ids[-n:])
        return float(rows[np.arange(n), targets].sum()), bool((rows.argmax(axis=-1) == targets).all())

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            whole, head = self._ids(context + continuation), self._ids(context)
            # The continuation's ids are what the whole text adds to the context's (tokenizers merge across the
            # boundary); the harness's own models do the same.
            if whole[:len(head)] == head and len(whole) > len(head):
                out.append(self._score(head, whole[len(head):]))
            else:
                out.append(self._score(head, self._ids(continuation)))
        return out

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        out = []
        for request in requests:
            ids, total = self._ids(request.args[0]), 0.0
            for start in range(0, len(ids), self.n_ctx):
                total += self._score(ids[max(0, start - self.n_ctx // 2):start], ids[start:start + self.n_ctx])[0]
            out.append(total)
        return out

    def generate_until(self, requests: list) -> list[str]:
        out = []
        for request in requests:
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = ([self.bos] if self.bos is not None else []) + self._ids(context)
            # Prompt and generation share the window: the generation gets at most all but one position, and the
            # context keeps its end, as the harness's own models cut it.
            tokens = max(1, min(int(options.get("max_gen_toks", 64)), self.n_ctx - 1))
            text = self.runtime.detokenize(self.model, self.runtime.generate(
                self.model, ids[-(self.n_ctx - tokens):], tokens))
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def make_lm(runtime: Any, model: Any, n_ctx: int) -> Any:
    from lm_eval.api.model import LM

    class _LM(RuntimeLM, LM):
        def __init__(self):
            LM.__init__(self)
            RuntimeLM.__init__(self, runtime, model, n_ctx)

    return _LM()


def run_tasks(runtime: Any, model: Any, evalset: Path, *, n_ctx: int, limit: int = 0) -> dict[str, Any]:
    """Each task of the evaluation set on ``model``: its metrics, their standard errors and the documents scored."""
    import yaml

    source = evalset / TASKS_DIR
    with tempfile.TemporaryDirectory(prefix="quantmill-tasks-") as tmp:
        include = Path(tmp) / "include"
        include.mkdir()
        names = []
        for path in sorted(source.glob("*.yaml")):
            task = yaml.safe_load(path.read_text())
            files = task.get("dataset_kwargs", {}).get("data_files", {})
            # The data files travel with the evaluation set: point the task at their copies here.
            task.setdefault("dataset_kwargs", {})["data_files"] = {
                split: str(source / Path(f).name) if isinstance(f, str) else [str(source / Path(x).name) for x in f]
                for split, f in files.items()}
            (include / path.name).write_text(yaml.safe_dump(task, sort_keys=False))
            names.append(task["task"])
        os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                           "HF_DATASETS_CACHE": str(Path(tmp) / "datasets")})
        import logging

        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        results = simple_evaluate(model=make_lm(runtime, model, n_ctx), tasks=names,
                                  task_manager=TaskManager(include_path=str(include), include_defaults=False),
                                  limit=limit or None, bootstrap_iters=100, log_samples=False, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    out = {}
    for name in names:
        row = results["results"][name]
        metrics = {k.split(",")[0]: float(v) for k, v in row.items()
                   if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        errors = {k.split(",")[0][:-len("_stderr")]: float(v) for k, v in row.items()
                  if k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        out[name] = {"metrics": metrics, "stderr": errors, "docs": int(results["n-samples"][name]["effective"])}
    return out


def recovery(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Each task's main metric (``acc``, else the first) beside the unquantized model's, and their ratio."""
    rows = {}
    for name, row in ours.items():
        metric = "acc" if "acc" in row["metrics"] else next(iter(row["metrics"]))
        ref = reference.get(name, {}).get("metrics", {}).get(metric)
        value = row["metrics"][metric]
        rows[name] = {"metric": metric, "value": value, "stderr": row["stderr"].get(metric), "reference": ref,
                      "recovery": (value / ref) if ref else None, "docs": row["docs"]}
    return rows
