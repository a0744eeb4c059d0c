"""Benchmark: the ONNX INT4 recipe against ONNX Runtime GenAI's model builder run directly.

Both sides start from the same synthetic 1.1B-shape Llama (F16 safetensors), one after the other, alternating.
*Bare*: ``python -m onnxruntime_genai.models.builder -i MODEL -o OUT -p int4 -e cpu`` with the recipe's options.
*quantmill*: ``quantmill run 'recipe=[onnx_int4_cpu]' validate.enabled=false publish.enabled=false`` into an empty
store with the project's kept API server already running (the same work plus hashing, provenance and the store;
the FP32 intermediate is not built without validation). Peak RSS is each process tree's own.

    python bench/onnx_builder.py [SHAPE] [REPS]
    python bench/onnx_builder.py speed [SHAPE]

``speed``: ONNX INT4 generation beside llama.cpp Q4_0 and Q4_K_M on the same CPU, each measured by its own
validation (the same evaluation windows: prompt tokens/s over the windows, generation tokens/s greedy from the
same prompt ids, median over the runs, the first run a warm-up), one ``quantmill run`` for the three.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from gguf_pipeline import measure

HERE = Path(__file__).resolve().parent
OPTIONS = ["block_size=32", "accuracy_level=4", "algo_config=k_quant"]  # conf/recipe/onnx_int4_cpu.yaml


def bare(model: Path, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=work) as cache:
        seconds, rss, _ = measure([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", model, "-i", model,
                                   "-o", work / "out", "-p", "int4", "-e", "cpu", "-c", cache, "--extra_options",
                                   *OPTIONS], env={"HF_HUB_OFFLINE": "1"})
    size = sum(p.stat().st_size for p in (work / "out").iterdir())
    shutil.rmtree(work)
    return {"seconds": seconds, "max_rss": rss, "bytes": size}


def pipeline(model: Path, work: Path, name: str) -> dict:
    shutil.rmtree(work / "store", ignore_errors=True)
    seconds, rss, out = measure([Path(sys.executable).parent / "quantmill", "run", "--json", "model=local",
                                 f"model.path={model}", f"model.name={name}", "recipe=[onnx_int4_cpu]",
                                 "validate.enabled=false", "publish.enabled=false", f"store.root={work / 'store'}",
                                 f"infra.prefect_home={work / 'prefect'}"],
                                env={"HF_HUB_OFFLINE": "1", "QUANTMILL_PREFECT_SERVER": "kept"})
    steps = {s["spec_id"]: s["seconds"] for s in json.loads(out)["steps"]}
    return {"seconds": seconds, "max_rss": rss, "steps": steps, "orchestration_s": seconds - sum(steps.values())}


def main(shape: str = "llama-1.1b", reps: int = 2) -> dict:
    import synthetic

    out = HERE / "out"
    model = synthetic.make(shape, out / shape)
    work = out / "onnx-work"
    pipeline(model, work, shape)  # starts the kept server, as a user's earlier run would have
    results: dict = {"shape": shape, "params": synthetic.n_params(shape), "bare": [], "pipeline": []}
    for _ in range(reps):
        results["bare"].append(bare(model, work / "bare"))
        results["pipeline"].append(pipeline(model, work, shape))
    med = lambda side, k: statistics.median(r[k] for r in results[side])  # noqa: E731
    results["summary"] = {
        "bare_s": round(med("bare", "seconds"), 1), "pipeline_s": round(med("pipeline", "seconds"), 1),
        "ratio": round(med("pipeline", "seconds") / med("bare", "seconds"), 3),
        "bare_rss_mib": round(med("bare", "max_rss") / 2**20), "pipeline_rss_mib": round(med("pipeline", "max_rss") / 2**20),
        "orchestration_s": round(med("pipeline", "orchestration_s"), 1),
        "bare_mib": round(results["bare"][-1]["bytes"] / 2**20, 1),
        "steps_s": {k: round(v, 1) for k, v in results["pipeline"][-1]["steps"].items()},
        "cpus": os.cpu_count(),
    }
    (out / f"onnx_builder-{shape}.json").write_text(json.dumps(results, indent=1))
    return results


SPEED_RECIPES = ("gguf_q4_0", "gguf_q4_k_m", "onnx_int4_cpu")


def speed(shape: str = "llama-1.1b") -> dict:
    import synthetic

    out = HERE / "out"
    model = synthetic.make(shape, out / shape)
    work = out / "onnx-speed"
    shutil.rmtree(work, ignore_errors=True)
    seconds, _, printed = measure([Path(sys.executable).parent / "quantmill", "run", "--json", "model=local",
                                   f"model.path={model}", f"model.name={shape}", f"recipe=[{','.join(SPEED_RECIPES)}]",
                                   "publish.enabled=false", "validate.n_chunks=4", "validate.max_tokens=64",
                                   "validate.enforce=false", f"store.root={work / 'store'}",
                                   f"infra.prefect_home={work / 'prefect'}"],
                                  env={"HF_HUB_OFFLINE": "1", "QUANTMILL_PREFECT_SERVER": "kept"})
    steps = {s["spec_id"]: s for s in json.loads(printed)["steps"]}
    rows = {}
    for recipe in SPEED_RECIPES:
        r = steps[f"validate:{recipe}"]["result"]
        rows[recipe] = {k: r.get(k) for k in ("bits_per_weight", "mean_kld", "prompt_tokens_per_second",
                                             "generation_tokens_per_second", "speed_runs", "peak_rss_bytes",
                                             "execution", "load_1m")}
    results = {"shape": shape, "params": synthetic.n_params(shape), "cpus": os.cpu_count(), "rows": rows,
               "run_s": round(seconds, 1)}
    (out / f"onnx_speed-{shape}.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return results


def speed_markdown(results: dict) -> str:
    lines = [f"| {results['shape']}, {results['cpus']} CPU cores | bits/weight | prompt tok/s | generation tok/s | "
             f"peak RSS |", "|---|---:|---:|---:|---:|"]
    for recipe, r in results["rows"].items():
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" if r.get("peak_rss_bytes") else "-"
        lines.append(f"| {recipe} | {r['bits_per_weight']} | {r['prompt_tokens_per_second']} | "
                     f"{r['generation_tokens_per_second']} | {rss} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    s = results["summary"]
    n = len(results["bare"])
    return "\n".join([
        f"| {results['shape']} ({results['params'] / 1e9:.2f}B), ONNX INT4 CPU | bare builder | quantmill | ratio |",
        "|---|---:|---:|---:|",
        f"| wall time, median of {n} | {s['bare_s']} s | {s['pipeline_s']} s | {s['ratio']} |",
        f"| peak RSS | {s['bare_rss_mib']} MiB | {s['pipeline_rss_mib']} MiB | "
        f"{round(s['pipeline_rss_mib'] / s['bare_rss_mib'], 3)} |",
        "",
        f"Steps (s): {s['steps_s']}; outside the steps: {s['orchestration_s']} s; model files {s['bare_mib']} MiB.",
    ])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    args = sys.argv[1:]
    if args[:1] == ["speed"]:
        print(speed_markdown(speed(*args[1:2])))
    else:
        print(markdown(main(*(args[:1] or []), *(int(a) for a in args[1:2]))))
