"""One pipeline over two pools on a GPU machine: AWQ (or GPTQ) on pool `cuda`, GGUF recipes on pool `cpu`.

Starts a Prefect server, moto's S3 server and two workers on this machine (each with its own directory, Prefect
home and cache), runs the pipeline once, then reads back from the API and the bucket which pool and worker ran
each step and how long it took. The calibrated recipe is routed to the GPU by requiring CUDA
(``recipe.awq_w4a16.requires.device=cuda``), exactly as a team's conf would.

    python bench/gpu_pools.py [awq_w4a16|gptq_w4a16] [model overrides...]   # writes bench/out/gpu_pools.json
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cluster  # noqa: E402

from quantmill.prefect.workers import worker_of  # noqa: E402

OUT = _cluster.REPO / "bench" / "out" / "gpu_pools.json"
POOLS = "infra.pools={cpu:{capabilities:[cpu,llamacpp]},cuda:{capabilities:[cuda],min_gpu_memory_gb:16}}"


def main(recipe: str = "awq_w4a16", extra: list[str] | None = None) -> dict:
    cluster = _cluster.start([("cpu", "cpu-worker", []), ("cuda", "gpu-worker", [])], POOLS)
    try:
        from prefect.client.orchestration import get_client

        from quantmill.config import compose
        from quantmill.prefect.launch import run_config
        from quantmill.store import open_store, provenance
        from quantmill.toolchain.hardware import gpu_details

        cfg = compose(["infra=prefect", POOLS, "infra.max_parallel=4", *cluster.store_overrides("parent-cache"),
                       "publish.enabled=false", f"recipe=[{recipe},gguf_q8_0,gguf_q4_k_m]",
                       f"recipe.{recipe}.requires.device=cuda", *(extra or [])], conf_dir=_cluster.REPO / "conf")
        t0 = time.perf_counter()
        outcomes = run_config(cfg)
        wall = time.perf_counter() - t0
        store = open_store(cfg.store)
        with get_client(sync_client=True) as c:
            runs = {str(r.id): r for r in c.read_flow_runs(limit=200)}
        steps = []
        for o in outcomes:
            row = {"step": o.spec_id, "status": o.status, "seconds": o.seconds, "error": o.error,
                   "metrics": {k: o.result.get(k) for k in ("mean_kld", "ppl_ratio", "status", "bits_per_weight")
                               if k in o.result}}
            if o.key:
                run = provenance.run_of(store.statement(o.key))
                api = runs.get(run.get("prefect_flow_run_id", ""))
                row.update(pool=run.get("pool"), worker=run.get("worker"), gpu=run.get("gpu"),
                           api_pool=api.work_pool_name if api else None,
                           api_worker=worker_of(api) if api else None)
            steps.append(row)
        result = {"date": datetime.now().strftime("%Y-%m-%d"), "device": gpu_details(), "recipe": recipe,
                  "wall_s": wall, "ok": all(o.ok for o in outcomes), "steps": steps}
    finally:
        cluster.stop()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    return result


def markdown(r: dict) -> str:
    lines = [f"{r['recipe']} + GGUF Q8_0/Q4_K_M in one run, {r['wall_s']:.1f} s wall, ok={r['ok']} "
             f"({r['device'].get('gpu', 'no GPU')}, {r['date']})", "",
             "| step | pool | worker | status | time (s) | notes |", "|---|---|---|---|---|---|"]
    for s in r["steps"]:
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s["metrics"].items())
        lines.append(f"| {s['step']} | {s.get('pool') or ''} | {s.get('worker') or ''} | {s['status']} | "
                     f"{s['seconds']:.1f} | {notes or (s['error'] or '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(main(sys.argv[1] if len(sys.argv) > 1 else "awq_w4a16", sys.argv[2:])))
