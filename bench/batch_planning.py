"""Planning a batch's runs on S3: each run opening its own store against one store opened for the batch.

N runs of the bundled model (own model names, one shared download), store on moto's S3 server (127.0.0.1), the
download committed first. Each round plans all N once each way, the order alternating between rounds; medians over
rounds of the milliseconds per run.

    python bench/batch_planning.py [N] [ROUNDS]     # defaults 50 and 5
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(n: int = 50, rounds: int = 5) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    from quantmill.config import compose
    from quantmill.execute import run_step
    from quantmill.plan.build import plan
    from quantmill.prefect import launch
    from quantmill.store import open_store

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="batch-planning")
        root = Path(tempfile.mkdtemp(prefix="qm-batch-planning-"))
        base = ["store.kind=s3", "store.bucket=batch-planning", f"store.endpoint_url={url}",
                f"store.cache_dir={root / 'cache'}", f"infra.prefect_home={root / 'prefect'}",
                "publish.enabled=false", "validate.enabled=false", "recipe=[gguf_q8_0]"]
        cfgs = [compose([*base, f"model.name=tiny-{i:03d}"], conf_dir=REPO / "conf") for i in range(n)]
        store = open_store(cfgs[0].store)
        run_step(plan(cfgs[0], store).specs["download"], {}, store)
        ms: dict[str, list[float]] = {"own store per run": [], "one store for the batch": []}
        for r in range(rounds):
            for way in (list(ms) if r % 2 == 0 else list(ms)[::-1]):
                stores = {} if way == "one store for the batch" else None
                t0 = time.perf_counter()
                for cfg in cfgs:
                    launch.planned(cfg, stores=stores)
                ms[way].append((time.perf_counter() - t0) / n * 1000)
    finally:
        server.stop()
    result = {way: round(statistics.median(v), 1) for way, v in ms.items()}
    result["ratio"] = round(result["own store per run"] / result["one store for the batch"], 2)
    return {"runs": n, "rounds": rounds, "median_ms_per_run": result, "all_ms": ms}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(main(*args))
