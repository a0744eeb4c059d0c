"""Calibrated quantizers through a warm `cuda` pool against the bare llm-compressor script, on one GPU machine.

A team's GPU box runs `quantmill worker --pool cuda` with the pool's type `warm`: after a quantization, the worker
starts that backend's next quantizer process at once and keeps it waiting with torch and llm-compressor imported.
This measures what that buys on the pipeline's side of bench/gpu_quantizers.py's comparison. It starts `quantmill
server` (SQLite), moto's S3 endpoint (unused: the store is one local folder, the machine is one) and one warm
worker, whose pool (`cpu`, the conf's first) offers `cpu` and `cuda`, so every step of the pipeline runs on it. An untimed run of the first
recipe makes the download, the calibration set and the first quantization (whose process imports after the
request, as in a fresh pool). Then, for each recipe, one pair: the pipeline (`quantmill run infra=prefect`, whole
command, the quantized artifact dropped from the store before, so it quantizes again), a wait until the worker's
next quantizer process has imported (so it takes no CPU from the bare side), then the bare script, fed the same
calibration token ids.

    python bench/gpu_warm_pool.py --shape llama-1.1b --dtype bfloat16 --recipes fp8_dynamic,nvfp4 --models DIR \
        [--warmup fp8_dynamic] [--work DIR] [--out bench/out] [--samples 128 --seq-len 512]

``--warmup RECIPE``: the untimed first run quantizes with RECIPE instead of the first of ``--recipes`` (a data-free
FP8 run at 8B takes 40 s where GPTQ takes 150 s; the kept process serves every recipe of its backend). ``--work
DIR``: the store and calibration text there, kept across calls (a second call on the same machine finds the
download and the calibration set made).

On a machine without CUDA (trying it out): `--shape llama-tiny --recipes gptq_w4a16 --samples 16 --seq-len 128`
(the pool then offers `cpu` only). Rows go to OUT/gpu_warm_pool.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cluster  # noqa: E402
import gpu_quantizers as gq  # noqa: E402
import synthetic  # noqa: E402

KEPT = "quantmill.backends.quantizer_process --wait"


def kept_children() -> dict[int, float]:
    """Waiting quantizer processes on this machine: pid -> CPU seconds used so far (from /proc)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if KEPT not in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if fields[0] != "Z":
            found[int(proc.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def wait_imported(timeout: float = 180.0) -> float:
    """Seconds until a kept quantizer process exists and has stopped using CPU for a second (its imports done)."""
    start = time.monotonic()
    last: dict[int, float] = {}
    while time.monotonic() - start < timeout:
        now = kept_children()
        if now and now == last:
            return round(time.monotonic() - start - 1.0, 1)
        last = now
        time.sleep(1.0)
    raise RuntimeError(f"no quantizer process waited, imported, within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-1.1b", choices=list(synthetic.SHAPES))
    parser.add_argument("--recipes", default="fp8_dynamic,nvfp4,gptq_w4a16")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--models", default=None, help="where synthetic checkpoints are written (kept across calls)")
    parser.add_argument("--warmup", default=None, help="the untimed first run's recipe (default: the first)")
    parser.add_argument("--work", default=None, help="store and calibration text, kept across calls")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--samples", type=int, default=gq.SAMPLES)
    parser.add_argument("--seq-len", type=int, default=gq.SEQ_LEN)
    args = parser.parse_args()
    gq.SAMPLES, gq.SEQ_LEN = args.samples, args.seq_len
    import torch

    cuda = torch.cuda.is_available()
    # The conf's first pool, given CUDA: every step of the run goes to the one warm worker.
    pools = f"infra.pools={{cpu:{{capabilities:[cpu{',cuda' if cuda else ''}],type:warm}}}}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qm-warm-pool-"))
    work.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.dtype == "float16" else "-bf16"
    model = synthetic.make(args.shape, Path(args.models or work) / (args.shape + suffix), dtype=args.dtype)
    text = gq.calibration_text(work)
    store = work / "store"
    recipes = args.recipes.split(",")
    cluster = _cluster.start([("cpu", "gpu-worker", [])], pools)
    env = {**cluster.env, "PREFECT_HOME": str(work / "parent-prefect")}

    def command(recipe: str) -> list[str]:
        overrides = [o if not o.startswith("calibration.min_samples=") else f"calibration.min_samples={args.samples}"
                     for o in gq.pipeline_overrides(args.shape, model, [recipe], store, work, text)]
        return [sys.executable, "-m", "quantmill.cli", "run", "infra=prefect", pools, *overrides]

    def record(row: dict) -> None:
        row = {**row, "dtype": args.dtype, "pool": "warm"}
        print(json.dumps(row), flush=True)
        with (out / "gpu_warm_pool.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        first = args.warmup or recipes[0]
        seconds, _ = gq.timed(command(first), env)  # download, calibration set, a quantizer imported on request
        record({"shape": args.shape, "recipe": first, "warmup": True, "pipeline_s": round(seconds, 1),
                "steps_s": gq.step_seconds(store)})
        gq.drop_quantized(store, gq.RECIPES[first][0])
        for recipe in recipes:
            try:
                waited = wait_imported()
                before = gq.step_seconds(store)
                pipeline_s, _ = gq.timed(command(recipe), env)
                quant = gq.quantized_dir(store, gq.RECIPES[recipe][0])
                result = json.loads((quant / "quantmill.json").read_text())
                row = {"shape": args.shape, "recipe": recipe, "pipeline_s": round(pipeline_s, 1),
                       "kept_child_imported_after_s": waited, "pipeline_phases_s": result.get("phases_s"),
                       "pipeline_peak_gpu_gib": round((result.get("peak_gpu_bytes") or 0) / 2**30, 2),
                       "pipeline_out_gb": round(gq.out_bytes(quant) / 1e9, 3), "device": result.get("device"),
                       "steps_s": {k: v for k, v in gq.step_seconds(store).items() if k not in before}}
                gq.drop_quantized(store, gq.RECIPES[recipe][0])
                row["bare_waited_for_kept_s"] = wait_imported()
                row.update(gq.bare_row(args.shape, model, gq.calibration_file(store), recipe, work))
                row["ratio"] = round(pipeline_s / row["bare_s"], 3)
                record(row)
            except Exception as e:  # noqa: BLE001 - one failed recipe must not lose the others' rows
                record({"shape": args.shape, "recipe": recipe, "error": str(e)[-1500:]})
    finally:
        cluster.stop()
        shutil.copyfile(cluster.root / "gpu-worker" / "worker.log", out / "gpu_warm_pool-worker.log")


if __name__ == "__main__":
    main()
