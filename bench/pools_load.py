"""Load on worker pools: N small runs queued at once through two workers; the orchestration overhead of each.

Starts what the pools integration test starts (a Prefect server, moto's S3 server, two `quantmill worker`s on pool
`cpu`, each with its own directory, Prefect home and cache, `--limit 1`), then submits N runs at once from one
process (N parent flows in threads). Each run is the bundled model to GGUF Q8_0 under its own model name, so its
convert and quantize steps are new (one step run on the pool; the download is shared).

Per run, from Prefect's API and the provenance records:
  wall      from calling the pipeline to its return
  steps     time inside step functions (provenance startedOn..finishedOn)
  queued    time its step run waited behind earlier ones: while at least as many step runs created before it
            had not ended as there are workers. Each hand-over between runs (release, claim, start) is thereby
            counted once, as overhead of the run handed to, not again for every run still behind it in the queue.
            (Prefect serves a pool's runs in scheduled-time order, taken just before each run is created; where
            that order differs from creation order, the extra wait counts as overhead, not as queue.)
            In a batch (--batch) the parent holds the runs no worker can take yet (infra.queue_ahead) and creates
            each step run when a worker takes an earlier one, so a run waits its turn before its step run exists:
            there, queued counts from the run's start, while at least as many step runs of runs ahead of it in
            the batch (first come, first served) were created and not ended as there are workers. The
            creation-based figure is kept beside it (overhead_from_creation_s).
  overhead  wall - steps - queued: planning, dispatch, pickup, process start, Prefect engine, S3 transfers,
            waiting for the end; under load, the parents' own slowness included.
  handover  per worker, from the end of one step run to the start of its next: what a worker waits between two
            runs while the queue is full (no queue accounting needed).
Also, for the whole load: worker-seconds not spent in step functions per run, (total x workers - sum of
steps) / runs, the throughput cost of the orchestration.

    python bench/pools_load.py [N]            # writes bench/out/pools_load.json
    python bench/pools_load.py N --serial     # the same runs one at a time (no queueing): bench/out/pools_serial.json
    python bench/pools_load.py N [--serial] --warm   # workers of pool type `warm` (quantmill.prefect.warm_worker): *_warm.json
    python bench/pools_load.py N --warm --database-url postgresql+asyncpg://USER@HOST:PORT/DB   # server on PostgreSQL
    python bench/pools_load.py N [--warm] --batch [--queue-ahead K]   # K: infra.queue_ahead (0: no bound)
    python bench/pools_load.py N [--warm] --batch   # the N runs as one batch (`quantmill batch` on pools: one
                                                    # parent flow run for all): *_batch.json; a run ends when the
                                                    # parent has its outcomes (its final state made)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cluster  # noqa: E402

from quantmill.prefect.workers import worker_of  # noqa: E402

REPO = _cluster.REPO
OUT = REPO / "bench" / "out" / "pools_load.json"
POOLS = "infra.pools={cpu:{capabilities:[cpu,llamacpp]}}"


def main(n: int = 50, serial: bool = False, warm: bool = False, database_url: str | None = None,
         batch: bool = False, queue_ahead: int | None = None) -> dict:
    pools = POOLS.replace("llamacpp]", "llamacpp],type:warm") if warm else POOLS
    cluster = _cluster.start([("cpu", "w1", ["--limit", "1"]), ("cpu", "w2", ["--limit", "1"])], pools, bucket="load",
                             database_url=database_url)
    try:
        from prefect.client.orchestration import get_client

        from quantmill.config import compose
        from quantmill.prefect.launch import run_config, run_configs

        base = ["infra=prefect", pools, "infra.max_parallel=1", *cluster.store_overrides("parent-cache"),
                "publish.enabled=false", "validate.enabled=false", "recipe=[gguf_q8_0]",
                *([f"infra.queue_ahead={queue_ahead}"] if queue_ahead is not None else [])]
        run_config(compose([*base, "model.name=warmup"], conf_dir=REPO / "conf"))  # the shared download

        configs = [compose([*base, f"model.name=tiny-{i:03d}"], conf_dir=REPO / "conf") for i in range(n)]

        def one(i):  # Hydra's compose is not thread-safe: composed above
            cfg = configs[i]
            if not serial:
                time.sleep(0.1 * i)  # submitted over 5 s, as a batch script would
            t0 = time.time()
            outcomes = run_config(cfg)
            return {"run": i, "start": t0, "end": time.time(), "ok": all(o.ok for o in outcomes),
                    "ran": [o.spec_id for o in outcomes if o.status == "ran"],
                    "errors": [f"{o.spec_id}: {o.error}" for o in outcomes if not o.ok],
                    "steps_s": sum(o.seconds for o in outcomes if o.status == "ran")}

        t0 = time.time()
        if batch:
            runs = one_batch(configs, run_configs)
        else:
            with ThreadPoolExecutor(max_workers=1 if serial else n) as pool:
                runs = list(pool.map(one, range(n)))
        total = time.time() - t0
        step_runs = []
        with get_client(sync_client=True) as c:  # the API pages at 200
            while page := c.read_flow_runs(limit=200, offset=len(step_runs)):
                step_runs += page
        step_runs = [r for r in step_runs if "pool:cpu" in r.tags]  # not the watches' scheduled runs
    finally:
        cluster.stop()

    by_worker: dict[str, list] = {}
    for r in step_runs:
        worker = worker_of(r) or "?"
        by_worker.setdefault(worker, []).append(r)
    spans = [(r.created.timestamp(), r.end_time.timestamp(), r.id) for r in step_runs]
    owner = {r.id: next((int(s["config"]["model_name"].removeprefix("tiny-")) for s in r.parameters.get("specs", [])
                         if s.get("config", {}).get("model_name", "").startswith("tiny-")), -1)
             for r in step_runs if r.parameters}  # step run -> the benchmark run it serves (-1: the warm-up's)
    handovers = _handovers(by_worker)
    rows = []
    for run in runs:
        mine = [r for r in step_runs if owner.get(r.id) == run["run"]]
        since_created = [queued_seconds(spans, r.created.timestamp(), r.start_time.timestamp(), len(by_worker))
                         for r in mine]
        queued, from_creation = since_created, sum(since_created)
        if batch:  # the parent holds the queue: count the turn from the run's start, behind the runs ahead
            ahead = [(c, e, i) for c, e, i in spans if owner.get(i, run["run"]) < run["run"]]
            queued = [queued_seconds(ahead, run["start"], r.start_time.timestamp(), len(by_worker), given=True)
                      for r in mine]
        q = sum(queued)
        wall = run["end"] - run["start"]
        # where the overhead goes: worker pickup + process start before the step run starts, the step run's own
        # time outside step functions (engine, S3, hashing), and the rest in the parent (plan, dispatch, waiting)
        pickup = sum((r.start_time - r.created).total_seconds() - w for r, w in zip(mine, since_created))
        in_run = sum((r.end_time - r.start_time).total_seconds() for r in mine) - run["steps_s"]
        rows.append({**run, "wall_s": wall, "queued_s": q, "overhead_s": wall - run["steps_s"] - q,
                     "overhead_from_creation_s": wall - run["steps_s"] - from_creation,
                     "pickup_s": pickup, "step_run_outside_steps_s": in_run,
                     "parent_s": wall - run["steps_s"] - q - pickup - in_run, "step_runs": len(mine),
                     "step_run_times": [(r.created.timestamp(), r.start_time.timestamp(), r.end_time.timestamp())
                                        for r in mine]})
    overheads = sorted(r["overhead_s"] for r in rows)
    p95 = overheads[min(len(overheads) - 1, int(round(0.95 * (len(overheads) - 1))))]
    result = {"date": datetime.now().strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "runs": n,
              "mode": ("one at a time" if serial else "one batch" if batch else "queued at once")
              + (", warm workers" if warm else "")
              + (", PostgreSQL server" if database_url else "")
              + (f", queue_ahead {queue_ahead}" if queue_ahead is not None else ""),
              "completed": sum(r["ok"] for r in rows), "total_s": total,
              "median_overhead_s": statistics.median(overheads), "p95_overhead_s": p95,
              "median_overhead_from_creation_s": statistics.median(r["overhead_from_creation_s"] for r in rows),
              "median_handover_s": statistics.median(handovers) if handovers else None,
              "p95_handover_s": handovers[min(len(handovers) - 1, int(round(0.95 * (len(handovers) - 1))))]
              if handovers else None,
              "median_steps_s": statistics.median(r["steps_s"] for r in rows),
              "median_wall_s": statistics.median(r["wall_s"] for r in rows),
              **{f"median_{k}": statistics.median(r[k] for r in rows)
                 for k in ("pickup_s", "step_run_outside_steps_s", "parent_s")},
              "worker_s_outside_steps_per_run": (total * len(by_worker) - sum(r["steps_s"] for r in rows)) / n,
              "step_runs_per_worker": {w: len(rs) for w, rs in by_worker.items()}, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out = OUT.with_name("pools_serial.json") if serial else OUT
    out = out.with_name(out.stem + "_warm.json") if warm else out
    out = out.with_name(out.stem + "_batch.json") if batch else out
    out = out.with_name(out.stem + f"_ahead{queue_ahead}.json") if queue_ahead is not None else out
    (out.with_name(out.stem + "_postgres.json") if database_url else out).write_text(json.dumps(result, indent=1))
    return result


def one_batch(configs: list, run_configs) -> list[dict]:
    """All configs in one ``run_configs`` call (one parent flow run); each run's end is when the parent made its
    final state, read by wrapping the parent's ``DrivenRun.finish`` in this process."""
    from quantmill.prefect import scheduler as parent

    ends: dict[str, float] = {}
    finish = parent.DrivenRun.finish

    def timed(self):
        state = finish(self)
        ends[self.cfg.model.name] = time.time()
        return state

    parent.DrivenRun.finish = timed
    t0 = time.time()
    try:
        results = run_configs(configs)
    finally:
        parent.DrivenRun.finish = finish
    return [{"run": i, "start": t0, "end": ends[cfg.model.name], "ok": all(o.ok for o in outcomes),
             "ran": [o.spec_id for o in outcomes if o.status == "ran"],
             "errors": [f"{o.spec_id}: {o.error}" for o in outcomes if not o.ok],
             "steps_s": sum(o.seconds for o in outcomes if o.status == "ran")}
            for i, (cfg, outcomes) in enumerate(zip(configs, results))]


def _handovers(by_worker: dict[str, list]) -> list[float]:
    """Each worker's waits from the end of a step run to the start of its next one, sorted."""
    gaps = []
    for rs in by_worker.values():
        rs = sorted(rs, key=lambda r: r.start_time)
        gaps += [(b.start_time - a.end_time).total_seconds() for a, b in zip(rs, rs[1:])]
    return sorted(gaps)


def queued_seconds(spans: list[tuple[float, float, object]], created: float, started: float, workers: int,
                   given: bool = False) -> float:
    """Seconds of [created, started] during which at least ``workers`` step runs created before this one had
    not ended: the time it waited its turn (first come, first served), however fast the hand-overs. ``given``:
    ``spans`` are already the runs ahead (a batch's earlier runs), each in flight from its creation to its end."""
    if given:
        cuts = sorted({created, started, *(t for c, e, _ in spans for t in (c, e) if created < t < started)})
        return sum(b - a for a, b in zip(cuts, cuts[1:])
                   if sum(c <= (a + b) / 2 < e for c, e, _ in spans) >= workers)
    ahead = [(c, e) for c, e, _ in spans if c < created and e > created]
    cuts = sorted({created, started, *(e for _, e in ahead if created < e < started)})
    return sum(b - a for a, b in zip(cuts, cuts[1:]) if sum(e > (a + b) / 2 for _, e in ahead) >= workers)


def markdown(r: dict) -> str:
    return (f"{r['runs']} runs {r['mode']}, {r['completed']} completed in {r['total_s']:.0f} s on two workers "
            f"({r['step_runs_per_worker']}); per run: median wall {r['median_wall_s']:.1f} s, median time in step "
            f"functions {r['median_steps_s']:.2f} s, orchestration overhead median {r['median_overhead_s']:.2f} s, "
            f"p95 {r['p95_overhead_s']:.2f} s (counted from step-run creation: median "
            f"{r['median_overhead_from_creation_s']:.2f} s); worker hand-over median "
            f"{r['median_handover_s'] or 0:.2f} s, p95 {r['p95_handover_s'] or 0:.2f} s; of it (medians): pickup and "
            f"process start {r['median_pickup_s']:.2f} s, "
            f"inside the step run outside steps {r['median_step_run_outside_steps_s']:.2f} s, parent "
            f"{r['median_parent_s']:.2f} s; worker-seconds outside step functions per run "
            f"{r['worker_s_outside_steps_per_run']:.2f} s ({r['machine']}, {r['date']})")


if __name__ == "__main__":
    argv = sys.argv[1:]
    url = argv[argv.index("--database-url") + 1] if "--database-url" in argv else None
    ahead = argv[argv.index("--queue-ahead") + 1] if "--queue-ahead" in argv else None
    args = [a for a in argv if not a.startswith("--") and a not in (url, ahead)]
    print(markdown(main(int(args[0]) if args else 50, serial="--serial" in argv, warm="--warm" in argv,
                        database_url=url, batch="--batch" in argv,
                        queue_ahead=int(ahead) if ahead is not None else None)))
