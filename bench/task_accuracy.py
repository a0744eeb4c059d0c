"""Benchmark: task accuracy (lm-eval, the bundled cloze task) of the unquantized model and each quant, on the
bundled model and the deeper 6-layer model (``bench/deep_llama.py``), and what the tasks add to a validation.

One ``quantmill run`` per model with ``validate.tasks=[bundled:quantmill_cloze.yaml]``: GGUF Q8_0, Q4_K_M and Q2_K
in llama.cpp, ONNX INT4 in ONNX Runtime and GPTQ W4A16 in transformers, each scored on the task in its own runtime;
then the same recipes without tasks, so the validation steps' seconds can be set side by side.

    python bench/task_accuracy.py [bundled|deep ...]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = ["gguf_q8_0", "gguf_q4_k_m", "gguf_q2_k", "onnx_int4_cpu", "gptq_w4a16"]
TASK = "validate.tasks=[bundled:quantmill_cloze.yaml]"


def _model_args(which: str) -> list[str]:
    if which == "bundled":
        return []
    from deep_llama import make

    return ["model=local", f"model.path={make()}", "model.name=deep-llama-6l"]


def run(which: str, work: Path, tasks: bool) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    done = subprocess.run([str(Path(sys.executable).parent / "quantmill"), "run", "--json", *_model_args(which),
                           f"recipe=[{','.join(RECIPES)}]", *([TASK] if tasks else []), "validate.enforce=false",
                           "publish.enabled=false", f"store.root={work / 'store'}",
                           f"infra.prefect_home={work / 'prefect'}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    steps = {s["spec_id"]: s for s in json.loads(done.stdout)["steps"]}
    shutil.rmtree(work, ignore_errors=True)
    return steps


def main(models: list[str]) -> dict:
    results = {}
    for which in models:
        work = HERE / "out" / f"tasks-{which}"
        with_tasks, without = run(which, work, True), run(which, work, False)
        rows = {}
        for recipe in RECIPES:
            r = with_tasks[f"validate:{recipe}"]["result"]
            task = r["tasks"]["quantmill_cloze"]
            rows[recipe] = {"bits_per_weight": r["bits_per_weight"], "mean_kld": r["mean_kld"],
                            "acc": task["value"], "stderr": task["stderr"], "reference": task["reference"],
                            "recovery": task["recovery"], "validate_s": with_tasks[f"validate:{recipe}"]["seconds"],
                            "validate_s_without": without[f"validate:{recipe}"]["seconds"]}
        ratio = statistics.median(v["validate_s"] / v["validate_s_without"] for v in rows.values())
        results[which] = {"rows": rows, "median_validation_ratio": round(ratio, 2), "cpus": os.cpu_count()}
    (HERE / "out" / "task_accuracy.json").write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict) -> str:
    lines = []
    for which, res in results.items():
        ref = next(iter(res["rows"].values()))["reference"]
        lines += [f"| {which} | bits/weight | mean KLD | cloze acc (original {ref:.3f}) | recovery | validation s "
                  f"(without tasks) |", "|---|---:|---:|---:|---:|---:|"]
        for recipe, v in res["rows"].items():
            lines.append(f"| {recipe} | {v['bits_per_weight']:.2f} | {v['mean_kld']:.4f} | {v['acc']:.3f} ± "
                         f"{v['stderr']:.3f} | {100 * v['recovery']:.1f} % | {v['validate_s']:.1f} "
                         f"({v['validate_s_without']:.1f}) |")
        lines += ["", f"Median validation time with the task over without: {res['median_validation_ratio']}×", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(markdown(main(sys.argv[1:] or ["bundled", "deep"])))
