"""validate: measure each artifact against the unquantized model, in the runtime its users will load it with.

Three kinds of work, each its own cached artifact:

- ``make_evalset``: the evaluation windows as fixed token ids (from the source tokenizer), the smoke prompt's ids,
  and the tokenizer probes with their source ids; every runtime is fed exactly these ids.
- ``reference``: the unquantized model's log-probabilities on those windows (once per model revision, evaluation
  set and context length).
- ``validate``: one artifact's perplexity and ratio, mean and 99th-percentile KL divergence, top-1 agreement,
  speed, peak memory, a smoke generation and tokenizer fidelity, checked against the recipe's gates.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from quantmill import constants as C
from quantmill.errors import PreflightError, ToolError
from quantmill.evaluation.evaluate import EVALSET_META, EVALSET_TOKENS
from quantmill.evaluation.metrics import check_gates
from quantmill.toolchain.hardware import machine_info
from quantmill.toolchain.source_tokenizer import SourceTokenizer
from quantmill.toolchain.tools import run_tool


def make_evalset(model_dir: Path, files: Sequence[Path], out: Path, *, n_ctx: int, n_chunks: int, prompt: str,
                 probes: Sequence[str], tasks: Sequence[Path] = (), task_limit: int = 0) -> dict[str, Any]:
    """Tokenize the evaluation text once with the source tokenizer into ``n_chunks`` windows of ``n_ctx`` ids.

    Raises:
        PreflightError: the text is shorter than one window.
    """
    import numpy as np
    from safetensors.numpy import save_file

    tok = SourceTokenizer(model_dir)
    ids = tok.encode(tok.text_of(list(files)))
    windows = min(n_chunks, len(ids) // n_ctx)
    if windows < 1:
        raise PreflightError(f"evaluation text has {len(ids)} tokens, shorter than one window of "
                             f"validate.n_ctx={n_ctx}; add text or lower validate.n_ctx")
    bos = tok.special_id("bos_token")
    tokens = np.asarray(ids[: windows * n_ctx], dtype=np.int32).reshape(windows, n_ctx)
    save_file({"tokens": tokens}, str(out / EVALSET_TOKENS))
    meta = {
        "n_ctx": n_ctx, "n_chunks": windows, "requested_chunks": n_chunks,
        "prompt": prompt, "prompt_ids": ([bos] if bos is not None else []) + tok.encode(prompt),
        "probes": [{"text": p, "ids": tok.encode(p)} for p in probes],
        "bos_id": bos, "eos_id": tok.special_id("eos_token"), "chat_template": tok.chat_template,
    }
    if tasks:  # lm-eval task files and their data, run by every reference and validation of this set
        import shutil

        from quantmill.evaluation.tasks import TASKS_DIR, task_names

        (out / TASKS_DIR).mkdir()
        for path in tasks:
            shutil.copyfile(path, out / TASKS_DIR / path.name)
        meta["tasks"] = task_names(tasks)
        meta["task_limit"] = task_limit
    (out / EVALSET_META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return {"windows": windows, "n_ctx": n_ctx, "tokens": int(tokens.size), "probes": len(probes),
            **({"tasks": meta["tasks"]} if tasks else {})}


def _evaluate(mode: str, runtime: str, artifact: Path, evalset: Path, reference: Path | None,
              reference_out: Path | None, *, threads: int, max_tokens: int, label: str,
              flips: tuple[int, int] = (0, 0), offload_curve: int = 0) -> tuple[dict, int]:
    """Run ``quantmill.evaluation.evaluate`` in a process of its own (``quantmill.evaluation.process``); return its
    result and that process's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="quantmill-eval-") as tmp:
        request = {"mode": mode, "runtime": runtime, "artifact": str(artifact), "evalset": str(evalset),
                   "reference": str(reference) if reference else None,
                   "reference_out": str(reference_out) if reference_out else None,
                   "result_path": str(Path(tmp) / "result.json"), "threads": threads, "max_tokens": max_tokens,
                   "flips": list(flips), "offload_curve": offload_curve}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        # cwd: ``python -m`` puts it first on sys.path, and the run's own directory may hold another checkout
        run = run_tool([sys.executable, "-m", "quantmill.evaluation.process", "evaluate", Path(tmp) / "request.json"],
                       name=f"evaluation in runtime {runtime!r}", label=label, cwd=Path(tmp))
        return json.loads((Path(tmp) / "result.json").read_text()), run.max_rss_bytes


def reference(runtime: Any, model: Path, evalset: Path, out: Path, *, threads: int,
              flips: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """The unquantized model's log-probabilities on the evaluation windows and its greedy continuations (written to
    ``out``)."""
    result, _ = _evaluate("reference", runtime.key, model, evalset, None, out, threads=threads, max_tokens=1,
                          label="reference log-probabilities", flips=flips)
    # Only what is reproducible goes into the artifact: no timings.
    return {"runtime": runtime.key, "ppl": result["ppl"], "scored_tokens": result["scored_tokens"],
            **({"tasks": result["tasks"]} if "tasks" in result else {})}


def validate(runtime: Any, artifact: Path, evalset: Path, reference_dir: Path, *, gates: dict[str, Any],
             max_tokens: int, threads: int, label: str, offload_curve: int = 0) -> dict[str, Any]:
    """Measure the artifact; return its validation record (``status`` passed only if every check and gate passed).
    ``offload_curve``: tokens generated at each point of the layer-offload curve (0: no curve)."""
    record: dict[str, Any] = {"runtime": runtime.key, "machine": machine_info()}
    files = sorted(p for p in artifact.iterdir() if p.is_file() and p.name != C.RESULT_FILE)
    record["size_bytes"] = sum(p.stat().st_size for p in files)
    record["bits_per_weight"] = round(runtime.bits_per_weight(artifact), 4)
    try:
        metrics, peak = _evaluate("compare", runtime.key, artifact, evalset, reference_dir, None, threads=threads,
                                  max_tokens=max_tokens, label=label, offload_curve=offload_curve)
    except ToolError as e:  # the runtime could not load or run it: a failed artifact, recorded with the reason
        if e.returncode is not None and e.returncode < 0:
            raise  # stopped by a signal: says nothing about the artifact, so no verdict is recorded
        record["checks"] = [{"name": "loads", "passed": False, "detail": str(e)}]
        record["status"] = C.FAILED
        return record
    quant = artifact / C.RESULT_FILE
    if quant.is_file() and "fallback_share" in (made := json.loads(quant.read_text())):
        metrics["fallback_share"] = made["fallback_share"]
    record.update(metrics)
    record["peak_rss_bytes"] = peak
    generated = metrics["generated_ids"]
    mode = metrics.get("execution", "native")
    checks = [{"name": "loads", "passed": True,
               "detail": f"loaded in {metrics['load_seconds']:.2f} s" + ("" if mode == "native" else f"; {mode}")},
              {"name": "generates", "passed": len(set(generated)) > 1,
               "detail": f"{len(generated)} tokens, {len(set(generated))} distinct"}]
    checks += check_gates(metrics, gates)
    record["checks"] = checks
    record["status"] = C.PASSED if all(c["passed"] for c in checks) else C.FAILED
    return record


def failed_checks(record: dict[str, Any]) -> list[str]:
    return [f"{c['name']} ({c['detail']})" for c in record.get("checks", []) if not c["passed"]]
