"""Evaluate one artifact in its runtime, in a process of its own (``quantmill.evaluation.process``).

A separate process gives each artifact its own peak-memory figure (the parent reads it with ``os.wait4``) and
keeps a runtime crash on a malformed artifact from taking the pipeline down with it.

Modes: ``reference`` writes the log-probabilities of the scored positions (computed once per model, evaluation
set and context length); ``compare`` measures an artifact against them. Both also time prompt processing and a
greedy generation, and check the artifact's tokenizer against the source tokenizer's ids.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.constants import FLIP_PROMPT_TOKENS
from quantmill.evaluation import metrics
from quantmill.toolchain.energy import EnergyMeter, GpuMemoryPeak, per_token

SPEED_RUNS = 3  # timed greedy generations after a warm-up; the median is reported, the range kept
EVALSET_TOKENS = "eval.safetensors"
EVALSET_META = "evalset.json"
REFERENCE_LOGPROBS = "reference.safetensors"
FLIPS = "flips.json"  # the reference's greedy continuations


def _sig(v: float) -> float:
    """Three significant figures: the noise of a shared machine is larger than the fourth."""
    return float(f"{v:.3g}")


def load_evalset(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from safetensors.numpy import load_file

    return load_file(str(path / EVALSET_TOKENS))["tokens"], json.loads((path / EVALSET_META).read_text())


def tokenizer_fidelity(runtime: Any, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Same ids for every probe, same BOS/EOS ids, same chat template as the source tokenizer."""
    mismatches = []
    for probe in meta["probes"]:
        got = runtime.tokenize(model, probe["text"])
        if got != probe["ids"]:
            first = next((i for i, (a, b) in enumerate(zip(got, probe["ids"])) if a != b), min(len(got), len(probe["ids"])))
            mismatches.append(f"{probe['text'][:24]!r}: {len(got)} ids vs {len(probe['ids'])}, first differs at {first}")
    specials = runtime.special_ids(model)
    for name in ("bos", "eos"):
        if meta.get(f"{name}_id") is not None and specials.get(name) != meta[f"{name}_id"]:
            mismatches.append(f"{name} id {specials.get(name)} != source {meta[f'{name}_id']}")
    template = runtime.chat_template(model)
    if (meta.get("chat_template") or None) != (template or None):
        mismatches.append("chat template differs" if template else "chat template lost")
    n = len(meta["probes"])
    detail = (f"{n} probes, special tokens and chat template match" if not mismatches
              else f"{len(mismatches)} mismatch(es): " + "; ".join(mismatches[:3]))
    return {"exact": not mismatches, "probes": n, "mismatches": mismatches, "detail": detail}


def _add(span: list, reading: dict[str, Any], tokens: int) -> None:
    span[0] += reading["joules"]
    span[1] += tokens
    span[2] += reading["seconds"]


def timed_generations(runtime: Any, model: Any, ids: list[int], tokens: int, meter: EnergyMeter,
                      spent: list) -> tuple[list[float], list[int]]:
    """``SPEED_RUNS`` greedy generations after a warm-up (the first call pays for allocations): their tokens/s, the
    last one's ids; the joules, tokens and seconds they took are added to ``spent`` where counters exist."""
    runtime.generate(model, ids, 2)
    speeds, generated = [], []
    for _ in range(SPEED_RUNS):
        start = time.perf_counter()
        if meter.available:
            meter.start()
        generated = runtime.generate(model, ids, tokens)
        if generated:
            speeds.append(len(generated) / (time.perf_counter() - start))
        if meter.available:
            _add(spent, meter.joules(), len(generated))
    return speeds, generated


def offload_curve(runtime: Any, artifact: Path, prompt_ids: list[int], tokens: int, n_ctx: int,
                  threads: int) -> dict[str, Any]:
    """Greedy generation speed, and joules per token where counters exist, with fewer and fewer layers on the GPU
    (the VRAM wall): the file loaded once per point, the median of ``SPEED_RUNS`` timed runs after a warm-up."""
    if not hasattr(runtime, "offload_points"):
        return {"available": False, "detail": f"not measured: runtime {runtime.key!r} has no layer offload"}
    points = runtime.offload_points(None)
    if isinstance(points, list):  # the layer counts come from the file
        with runtime.load(artifact, n_ctx=n_ctx, threads=threads) as model:
            points = runtime.offload_points(model)
    if isinstance(points, str):
        return {"available": False, "detail": points}
    rows = []
    for layers, on_gpu in zip(points, runtime.offloaded_bytes(artifact, points)):
        with runtime.load(artifact, n_ctx=n_ctx, threads=threads, gpu_layers=layers) as model:
            meter, spent = EnergyMeter(("gpu", "cpu")), [0.0, 0, 0.0]
            speeds, _ = timed_generations(runtime, model, prompt_ids, tokens, meter, spent)
            energy = per_token(meter, {"generated": tuple(spent)})
            rows.append({"gpu_layers": layers, "gpu_weight_bytes": on_gpu,
                         "generation_tokens_per_second": _sig(float(np.median(speeds))) if speeds else None,
                         "joules_per_generated_token": energy.get("joules_per_generated_token")})
    top = rows[0]["generation_tokens_per_second"]
    for row in rows:  # a model that ends its answer at once has no speed to compare
        speed = row["generation_tokens_per_second"]
        row["vs_all_on_gpu"] = round(speed / top, 3) if speed and top else None
    return {"available": True, "tokens": tokens, "points": rows}


def run(request: dict[str, Any]) -> dict[str, Any]:
    from safetensors.numpy import load_file, save_file

    from quantmill.backends import RUNTIMES

    runtime = RUNTIMES.get(request["runtime"])
    tokens, meta = load_evalset(Path(request["evalset"]))
    n_ctx = meta["n_ctx"]
    reference = None
    if request["mode"] == "compare":
        reference = load_file(str(Path(request["reference"]) / REFERENCE_LOGPROBS))["logprobs"]
    acc = metrics.Accumulator()
    kept = []
    result: dict[str, Any] = {"runtime": runtime.key, "mode": request["mode"], "n_ctx": n_ctx}
    gpu_memory = GpuMemoryPeak()
    with gpu_memory, runtime.load(Path(request["artifact"]), n_ctx=n_ctx, threads=request.get("threads", 0)) as model:
        result["load_seconds"] = round(model.load_seconds, 3)
        bos = runtime.special_ids(model)["bos"]
        meter = EnergyMeter(("gpu", "cpu") if "cuda" in str(getattr(model, "device", "")) else ("cpu",))
        spent = {"prompt": [0.0, 0, 0.0], "generated": [0.0, 0, 0.0]}  # joules, tokens, seconds
        prompt_speeds = []
        for i, window in enumerate(tokens):
            first = metrics.first_scored(n_ctx)
            start = time.perf_counter()
            if meter.available:
                meter.start()
            logits = runtime.logits(model, metrics.window_input(window, bos), first=first)
            prompt_speeds.append(window.size / (time.perf_counter() - start))
            if meter.available and i > 0:  # the first window warms the runtime up, as for speed
                _add(spent["prompt"], meter.joules(), int(window.size))
            logp = metrics.scored_logprobs(logits, n_ctx, offset=first)
            if not np.isfinite(logp).all():
                raise FloatingPointError(f"window {i}: non-finite logits")
            acc.add(logp, None if reference is None else reference[i], metrics.targets(window, n_ctx))
            if reference is None:
                kept.append(logp.astype(np.float32))
        generation_speeds, generated = timed_generations(runtime, model, meta["prompt_ids"], request["max_tokens"],
                                                         meter, spent["generated"])
        result["energy"] = per_token(meter, {k: (v[0], v[1], v[2]) for k, v in spent.items()})
        # The first window warms the runtime up; the median of the rest is the speed, their range its spread.
        timed = prompt_speeds[1:] or prompt_speeds
        result["prompt_tokens_per_second"] = _sig(float(np.median(timed)))
        result["generation_tokens_per_second"] = _sig(float(np.median(generation_speeds))) if generation_speeds else None
        result["speed_runs"] = {"prompt_tokens_per_second": [_sig(v) for v in timed],
                                "generation_tokens_per_second": [_sig(v) for v in generation_speeds]}
        result["load_1m"] = round(os.getloadavg()[0], 2)  # the machine's load as speeds were taken
        # How the model ran, read after it has: some runtimes change how they hold weights on the first forward.
        result["execution"] = runtime.held_as(model) if hasattr(runtime, "held_as") else getattr(
            model, "execution", "native")
        n_prompts, n_tokens = request.get("flips") or (0, 0)
        if n_prompts:  # greedy continuations of each window's start, as the reference made them
            continuations = [runtime.generate(model, metrics.window_input(w, bos)[:FLIP_PROMPT_TOKENS], n_tokens)
                             for w in tokens[:n_prompts]]
            if request["mode"] == "reference":
                (Path(request["reference_out"]) / FLIPS).write_text(json.dumps(
                    {"prompt_tokens": FLIP_PROMPT_TOKENS, "tokens": n_tokens, "continuations": continuations}))
        flips_file = Path(request["reference"] or "") / FLIPS
        if request["mode"] == "compare" and flips_file.is_file():
            reference_flips = json.loads(flips_file.read_text())
            ours = [runtime.generate(model, metrics.window_input(w, bos)[:reference_flips["prompt_tokens"]],
                                     reference_flips["tokens"])
                    for w in tokens[:len(reference_flips["continuations"])]]
            result.update(metrics.flips(ours, reference_flips["continuations"]))
        if meta.get("tasks"):  # lm-eval tasks on this model in this runtime; the reference's are the baseline
            from quantmill.evaluation.tasks import TASK_RESULTS, recovery, run_tasks

            scored = run_tasks(runtime, model, Path(request["evalset"]), n_ctx=n_ctx, limit=meta.get("task_limit", 0))
            if request["mode"] == "reference":
                (Path(request["reference_out"]) / TASK_RESULTS).write_text(json.dumps(scored, indent=1))
                result["tasks"] = recovery(scored, scored)
            else:
                reference_tasks = Path(request["reference"]) / TASK_RESULTS
                result["tasks"] = recovery(scored, json.loads(reference_tasks.read_text())
                                           if reference_tasks.is_file() else {})
                ratios = [r["recovery"] for r in result["tasks"].values() if r["recovery"] is not None]
                if ratios:
                    result["task_recovery"] = round(min(ratios), 4)
        result["generated_ids"] = generated
        result["generated_text"] = runtime.detokenize(model, generated)
        result["tokenizer"] = tokenizer_fidelity(runtime, model, meta)
    result.update(acc.summary())
    if gpu_memory.peak_bytes is not None and "cuda" in str(getattr(model, "device", "")):
        result["peak_gpu_memory_bytes"] = gpu_memory.peak_bytes  # the driver's, above what was in use before
    if request.get("offload_curve"):
        result["offload_curve"] = offload_curve(runtime, Path(request["artifact"]), meta["prompt_ids"],
                                                max(32, int(request["offload_curve"])), n_ctx,
                                                request.get("threads", 0))
    if reference is None:
        save_file({"logprobs": np.stack(kept)}, str(Path(request["reference_out"]) / REFERENCE_LOGPROBS))
    return result
