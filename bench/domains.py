"""Benchmark: what measuring every artifact on five domains costs against one (prose).

The bundled model, GGUF Q8_0, Q4_K_M and Q2_K, a fresh store each time: the seconds of each artifact's validation
steps (``validate:<recipe>`` and ``validate:<recipe>@<domain>``) and of the reference passes, with
``validate.domains=[]`` and with ``[code,math,multilingual,chat]``, alternating, median per artifact.

    python bench/domains.py [REPS]
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
RECIPES = ["gguf_q8_0", "gguf_q4_k_m", "gguf_q2_k"]
DOMAINS = "[code,math,multilingual,chat]"
LOOSE = [f"+validate.domain_gates.{d}.{g}=null" for d in ("multilingual", "chat") for g in ("max_mean_kld",
                                                                                            "max_ppl_ratio")]


def run(work: Path, domains: str) -> dict:
    shutil.rmtree(work / "store", ignore_errors=True)
    extra = LOOSE if domains != "[]" else []
    done = subprocess.run([str(Path(sys.executable).parent / "quantmill"), "run", "--json",
                           f"recipe=[{','.join(RECIPES)}]", f"validate.domains={domains}", *extra,
                           "publish.enabled=false", f"store.root={work / 'store'}",
                           f"infra.prefect_home={work / 'prefect'}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    steps = json.loads(done.stdout)["steps"]
    per_artifact = {r: sum(s["seconds"] for s in steps if s["step"] == "validate" and s["recipe"] == r
                           and s["spec_id"].startswith(f"validate:{r}")) for r in RECIPES}
    references = [s for s in steps if s["spec_id"].startswith("validate:reference-")]
    return {"per_artifact_s": per_artifact, "reference_s": sum(s["seconds"] for s in references),
            "reference_passes": len(references)}


def main(reps: int = 3) -> dict:
    work = HERE / "out" / "domains"
    results: dict = {"one": [], "five": []}
    for _ in range(reps):
        results["one"].append(run(work, "[]"))
        results["five"].append(run(work, DOMAINS))
    med = lambda side: statistics.median(  # noqa: E731
        statistics.median(r["per_artifact_s"].values()) for r in results[side])
    results["summary"] = {"one_s": round(med("one"), 2), "five_s": round(med("five"), 2),
                          "ratio": round(med("five") / med("one"), 2),
                          "reference_passes": [results["one"][0]["reference_passes"],
                                               results["five"][0]["reference_passes"]]}
    (HERE / "out" / "domains.json").write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict) -> str:
    s = results["summary"]
    n = len(results["one"])
    return "\n".join([
        "| bundled model, 3 GGUF artifacts | 1 domain (prose) | 5 domains | ratio |",
        "|---|---:|---:|---:|",
        f"| validation seconds per artifact, median of {n} runs | {s['one_s']} s | {s['five_s']} s | {s['ratio']} |",
        f"| reference passes for the 3 artifacts | {s['reference_passes'][0]} | {s['reference_passes'][1]} | |",
    ])


if __name__ == "__main__":
    print(markdown(main(*(int(a) for a in sys.argv[1:2]))))
