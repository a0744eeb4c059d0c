"""Benchmark: mixed precision toward a budget (gguf_auto) against llama.cpp's uniform k-quants, per model.

For each model: the uniform recipes Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K (imatrix on), then gguf_auto with one budget
at each uniform file's bits per weight (a ladder from one sensitivity measurement), per sensitivity method. Mean KLD
is measured on the evaluation text (the sensitivity only ever sees the calibration text). Reported per model:

- at the size of Q4_K_M and of Q3_K_M: the mix's mean KLD and how much lower than the uniform file's;
- whether every mix lies on or below the uniform ladder (the uniform KLD interpolated at the mix's size, log-linear);
- the rank correlation of predicted and measured KLD over the mixes, and of the imatrix estimate against the
  measured per-tensor costs (measured method);
- the sensitivity step's time as a multiple of one Q4_K_M quantize + validate of the same model.

    python bench/mixed_precision.py [MODEL ...]     # bundled (default), deep (bench/deep_llama.py), a local path
    python bench/mixed_precision.py cost PATH       # the sensitivity's cost on a larger model (bench/synthetic.py)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from quantmill.evaluation.metrics import rank_correlation  # noqa: E402

UNIFORM = ["gguf_q2_k", "gguf_q3_k_m", "gguf_q4_k_m", "gguf_q5_k_m", "gguf_q6_k"]


def loose(recipes: list[str]) -> list[str]:
    """Gates off: the benchmark measures every file, it does not publish."""
    return [f"++recipe.{r}.gates.{g}=null" for r in recipes for g in ("max_mean_kld", "max_ppl_ratio")]


def quantmill(work: Path, model: list[str], recipes: list[str], *overrides: str) -> list[dict]:
    done = subprocess.run([str(Path(sys.executable).parent / "quantmill"), "run", "--json", *model,
                           f"recipe=[{','.join(recipes)}]", *overrides, *loose(recipes), "publish.enabled=false", f"store.root={work / 'store'}",
                           f"infra.prefect_home={work / 'prefect'}", "infra.server=temporary"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode not in (0, 1):
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)["steps"]


def uniform_at(points: list[tuple[int, float]], size: int) -> float | None:
    """The uniform ladder's KLD at ``size``: log-linear between the two uniform files around it."""
    points = sorted(points)
    for (s0, k0), (s1, k1) in zip(points, points[1:]):
        if s0 <= size <= s1:
            t = (size - s0) / (s1 - s0)
            return math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0)))
    return None


def bench(name: str, model: list[str], methods: list[str]) -> dict:
    work = HERE / "out" / "mixed" / name
    shutil.rmtree(work, ignore_errors=True)
    steps = {s["spec_id"]: s for s in quantmill(work, model, UNIFORM)}
    uniform = {r: steps[f"validate:{r}"]["result"] for r in UNIFORM}
    q4_seconds = steps["quantize:gguf_q4_k_m"]["seconds"] + steps["validate:gguf_q4_k_m"]["seconds"]
    budgets = [uniform[r]["bits_per_weight"] for r in UNIFORM]
    out = {"model": name, "uniform": {r: {k: uniform[r][k] for k in ("bits_per_weight", "size_bytes", "mean_kld",
                                                                      "ppl_ratio", "top1_agreement")}
                                      for r in UNIFORM},
           "q4_k_m_quantize_validate_s": round(q4_seconds, 2), "methods": {}}
    for method in methods:
        steps = {s["spec_id"]: s for s in quantmill(
            work, model, ["gguf_auto"], f"recipe.gguf_auto.params.budget_bpw=[{','.join(map(str, budgets))}]",
            f"calibration.sensitivity.method={method}", "calibration.sensitivity.max_measured=100000")}
        sensitivity = steps["calibrate:sensitivity-gguf"]
        mixes = {}
        for r, b in zip(UNIFORM, budgets):
            v, q = steps[f"validate:gguf_auto-{b:g}"]["result"], steps[f"quantize:gguf_auto-{b:g}"]["result"]
            mixes[r] = {"bits_per_weight": v["bits_per_weight"], "size_bytes": v["size_bytes"],
                        "mean_kld": v["mean_kld"], "ppl_ratio": v["ppl_ratio"],
                        "top1_agreement": v["top1_agreement"], "predicted_kld": q["predicted_kld"],
                        "lower_than_uniform": 1 - v["mean_kld"] / uniform[r]["mean_kld"]}
        ladder = [(u["size_bytes"], u["mean_kld"]) for u in uniform.values()]
        below = {r: (m["mean_kld"] <= (uniform_at(ladder, m["size_bytes"]) or m["mean_kld"])) for r, m in mixes.items()}
        out["methods"][method] = {
            "mixes": mixes, "all_on_or_below_uniform": all(below.values()), "below": below,
            "predicted_vs_measured_rank_corr": rank_correlation([m["predicted_kld"] for m in mixes.values()],
                                                        [m["mean_kld"] for m in mixes.values()]),
            "estimate_rank_corr": sensitivity["result"].get("estimate_rank_correlation"),
            "sensitivity_s": sensitivity["seconds"], "sensitivity_passes": sensitivity["result"]["passes"],
            "sensitivity_tensors": sensitivity["result"]["tensors"],
            "sensitivity_over_q4_k_m": round(sensitivity["seconds"] / q4_seconds, 1)}
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| model | method | size of | uniform KLD | auto KLD | lower | auto bpw | on/below ladder | "
             "pred.↔meas. ρ | estimate ρ | sensitivity (× Q4_K_M q+v) |", "|" + "---|" * 11]
    for res in results:
        for method, m in res["methods"].items():
            for r in ("gguf_q4_k_m", "gguf_q3_k_m"):
                mix, uni = m["mixes"][r], res["uniform"][r]
                rho = m["predicted_vs_measured_rank_corr"]
                est = m["estimate_rank_corr"]
                lines.append(f"| {res['model']} | {method} | {r.removeprefix('gguf_').upper()} "
                             f"({uni['bits_per_weight']:.2f} bpw) | {uni['mean_kld']:.5f} | {mix['mean_kld']:.5f} | "
                             f"{100 * mix['lower_than_uniform']:.0f}% | {mix['bits_per_weight']:.2f} | "
                             f"{'yes' if m['all_on_or_below_uniform'] else 'no'} | "
                             f"{'' if rho is None else f'{rho:.2f}'} | {'' if est is None else f'{est:.2f}'} | "
                             f"{m['sensitivity_s']:.0f} s ({m['sensitivity_over_q4_k_m']}×) |")
    return "\n".join(lines)


def cost(path: Path) -> dict:
    """The sensitivity step's time against one Q4_K_M quantize + validate of the same model (a larger shape: the
    method ``auto`` picks the estimate there)."""
    work = HERE / "out" / "mixed" / f"cost-{path.name}"
    shutil.rmtree(work, ignore_errors=True)
    small = ["calibration.num_samples=16", "validate.n_chunks=4", "calibration.sensitivity.windows=4"]
    steps = {s["spec_id"]: s for s in quantmill(
        work, ["model=local", f"model.path={path}", f"model.name={path.name}"], ["gguf_q4_k_m", "gguf_auto"], *small)}
    q4 = steps["quantize:gguf_q4_k_m"]["seconds"] + steps["validate:gguf_q4_k_m"]["seconds"]
    sensitivity = steps["calibrate:sensitivity-gguf"]
    out = {"model": path.name, "q4_k_m_quantize_validate_s": round(q4, 1), "sensitivity_s": sensitivity["seconds"],
           "ratio": round(sensitivity["seconds"] / q4, 2), "method": sensitivity["result"]["method"],
           "passes": sensitivity["result"]["passes"], "tensors": sensitivity["result"]["tensors"],
           "auto_quantize_s": steps["quantize:gguf_auto"]["seconds"]}
    (HERE / "out" / f"mixed_precision-cost-{path.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return out


def main(names: list[str]) -> list[dict]:
    if names[:1] == ["cost"]:
        return [cost(Path(names[1]).resolve())]
    results = []
    for name in names or ["bundled"]:
        if name == "bundled":
            results.append(bench("bundled", [], ["measured", "estimate"]))
        elif name == "deep":
            from bench.deep_llama import make

            path = make()
            results.append(bench(path.name, ["model=local", f"model.path={path}", f"model.name={path.name}"],
                                 ["measured", "estimate"]))
        else:
            path = Path(name).resolve()
            results.append(bench(path.name, ["model=local", f"model.path={path}", f"model.name={path.name}"],
                                 ["estimate"]))
    (HERE / "out" / "mixed_precision.json").write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
