"""Benchmark: the ONNX INT4 recipe against ONNX Runtime GenAI's model builder run directly.

Both sides start from the same synthetic 1.1B-shape Llama (F16 safetensors), one after the other, alternating.
*Bare*: ``python -m onnxruntime_genai.models.builder -i MODEL -o OUT -p int4 -e cpu`` with the recipe's options.
*quantmill*: ``quantmill run 'recipe=[onnx_int4_cpu]' validate.enabled=false publish.enabled=false`` into an empty
store with the project's kept API server already running (the same work plus hashing, provenance and the store;
the FP32 intermediate is not built without validation). Peak RSS is each process tree's own.

    python bench/onnx_builder.py [SHAPE] [REPS]
    python bench/onnx_builder.py speed [SHAPE]

``speed``: ONNX INT4 beside llama.cpp Q4_0 and Q4_K_M on the same CPU: the three files made by one ``quantmill run``,
then each runtime timed in a process of its own on the same fixed token ids (prompt processing of 256 ids, greedy
generation of 64 tokens), median of 5 runs after a warm-up, two rounds alternating.
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
RUNTIME_OF = {"gguf": "llamacpp", "onnx": "onnx"}
PROMPT_IDS, GENERATED, RUNS = 256, 64, 5


def timing(runtime_key: str, artifact: str) -> dict:
    """In a process of its own: prompt tok/s over 256 fixed ids and greedy generation tok/s of 64 tokens from 16
    fixed ids, each the median of 5 runs after a warm-up; the process's peak RSS."""
    import resource
    import time

    if runtime_key == "llamacpp":
        from quantmill.toolchain.llamacpp import import_llama_cpp

        import_llama_cpp()
    from quantmill.backends import RUNTIMES

    runtime = RUNTIMES.get(runtime_key)
    ids = [1] + [(7 * i + 3) % 900 + 10 for i in range(PROMPT_IDS - 1)]  # fixed ids, the same for both runtimes
    with runtime.load(Path(artifact), n_ctx=512, threads=os.cpu_count()) as model:
        runtime.logits(model, ids[:32])
        runtime.generate(model, ids[:16], 4)
        prompt, gen = [], []
        for _ in range(RUNS):
            t = time.perf_counter()
            runtime.logits(model, ids)
            prompt.append(len(ids) / (time.perf_counter() - t))
            t = time.perf_counter()
            out = runtime.generate(model, ids[:16], GENERATED)
            gen.append(len(out) / (time.perf_counter() - t))
    return {"prompt_tok_s": round(statistics.median(prompt), 1), "generation_tok_s": round(statistics.median(gen), 1),
            "generation_runs": [round(g, 1) for g in gen], "generated": len(out),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def speed(shape: str = "llama-1.1b") -> dict:
    """Build Q4_0, Q4_K_M and ONNX INT4 of the shape with quantmill (cached after the first time), then time each
    runtime on the same fixed ids, alternating over two rounds."""
    import subprocess

    import synthetic

    out = HERE / "out"
    model = synthetic.make(shape, out / shape)
    work = out / "onnx-speed"
    done = subprocess.run([Path(sys.executable).parent / "quantmill", "run", "--json", "model=local",
                           f"model.path={model}", f"model.name={shape}", f"recipe=[{','.join(SPEED_RECIPES)}]",
                           "validate.enabled=false", "publish.enabled=false", f"store.root={work / 'store'}",
                           f"infra.prefect_home={work / 'prefect'}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    steps = {s["spec_id"]: s for s in json.loads(done.stdout)["steps"]}
    rows: dict = {}
    for _ in range(2):
        for recipe in SPEED_RECIPES:
            step = steps[f"quantize:{recipe}"]
            artifact = work / "store" / "objects" / step["key"] / "files"
            runtime = RUNTIME_OF["onnx" if recipe.startswith("onnx") else "gguf"]
            timed = subprocess.run([sys.executable, __file__, "_time", runtime, str(artifact)], capture_output=True,
                                   text=True, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            row = rows.setdefault(recipe, {"bits_per_weight": step["result"]["bits_per_weight"], "rounds": []})
            row["rounds"].append(json.loads(timed.stdout.strip().splitlines()[-1]))
    for row in rows.values():
        for key in ("prompt_tok_s", "generation_tok_s", "peak_rss_mib"):
            row[key] = round(statistics.median(r[key] for r in row["rounds"]), 1)
    results = {"shape": shape, "params": synthetic.n_params(shape), "cpus": os.cpu_count(), "rows": rows,
               "load_1m": round(os.getloadavg()[0], 2)}
    (out / f"onnx_speed-{shape}.json").write_text(json.dumps(results, indent=1))
    return results


def speed_markdown(results: dict) -> str:
    lines = [f"| {results['shape']}, {results['cpus']} CPU cores | bits/weight | prompt tok/s (256 ids) | "
             f"generation tok/s (64 tokens) | peak RSS |", "|---|---:|---:|---:|---:|"]
    for recipe, r in results["rows"].items():
        lines.append(f"| {recipe} | {r['bits_per_weight']:.2f} | {r['prompt_tok_s']} | {r['generation_tok_s']} | "
                     f"{r['peak_rss_mib']} MiB |")
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
    if args[:1] == ["_time"]:
        print(json.dumps(timing(args[1], args[2])))
    elif args[:1] == ["speed"]:
        print(speed_markdown(speed(*args[1:2])))
    else:
        print(markdown(main(*(args[:1] or []), *(int(a) for a in args[1:2]))))
