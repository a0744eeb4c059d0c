"""Benchmark (device machine): the whole format matrix of one synthetic shape through ``quantmill run`` on a GPU,
against the bare tools run one after another for the same set.

GGUF F16, Q8_0 and Q4_K_M (importance matrix, validations and the layer-offload curve in llama.cpp on the GPU),
AWQ and GPTQ W4A16, FP8 and NVFP4 (llm-compressor on the GPU, validated in transformers there). Three stages, each
writing its JSON to ``--out`` as soon as it is done (a device call may end before the last):

- ``pipeline``: ``quantmill run`` making every file, validation off, on a fresh store; two steps in flight at once
  (``infra.max_parallel=2``: llama-quantize on the CPU beside a calibrated quantizer on the GPU). Wall time.
- ``validate``: the same run with validation on, one step at a time (speed, memory and energy are measured alone):
  the files are cache hits, every artifact is validated with its speed, host and GPU peak memory, joules per token
  and, for GGUF, the offload curve. ``run.json``, ``report.json``, ``report.html``.
- ``bare``: the same set made by the bare tools, one after another: ``convert_hf_to_gguf.py``, ``llama-imatrix``
  (on the GPU) and ``llama-quantize`` as quantmill calls them, then one llm-compressor script per calibrated recipe
  (``bench/gpu_quantizers.py``'s) on the calibration token ids the pipeline made (run alone, it makes them with
  the plan's own steps first). It starts by deleting the pipeline's store: an 8B matrix twice does not fit a 64 GiB
  disk. ``ratio`` = pipeline wall / bare wall.

Prepare the machine first: ``python bench/gpu_carry.py --image-packages FILE --matrix --out .gpu-carry-matrix``
here, then there ``LLAMA_CPP_CUDA_ARCHS=90 CARRY=.gpu-carry-matrix . bench/gpu-setup.sh``.

    python3 bench/gpu_matrix.py [--shape llama-8b] [--recipes a,b] [--stages pipeline,validate,bare]
        [--max-tokens 128] [--offload-tokens 32] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
RECIPES = ["gguf_f16", "gguf_q8_0", "gguf_q4_k_m", "awq_w4a16", "gptq_w4a16", "fp8_dynamic", "nvfp4"]
GGUF = {"gguf_f16": None, "gguf_q8_0": ("Q8_0", False), "gguf_q4_k_m": ("Q4_K_M", True)}


def _overrides(args: argparse.Namespace, model: Path) -> list[str]:
    return ["model=local", f"model.path={model}", f"model.name={args.shape}", f"recipe=[{args.recipes}]",
            "publish.enabled=false", f"store.root={args.work / 'store'}", f"infra.prefect_home={args.work / 'prefect'}"]


def quantmill(args: argparse.Namespace, model: Path, stage: str, *extra: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", "--json", *_overrides(args, model),
                           "infra.server=temporary", *extra, "--config-dir", str(HERE.parent / "conf")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    (args.out / f"{stage}.log").write_text(done.stderr[-20000:])
    if not done.stdout.strip():
        raise SystemExit(f"quantmill run gave no result (exit {done.returncode}): {done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def pipeline(args: argparse.Namespace, model: Path) -> dict:
    shutil.rmtree(args.work / "store", ignore_errors=True)
    wall, run = quantmill(args, model, "pipeline", "validate.enabled=false", "infra.max_parallel=2")
    steps = {s["spec_id"]: s["seconds"] for s in run["steps"]}
    failed = [s["spec_id"] for s in run["steps"] if s["status"] == "failed"]
    return {"wall_s": round(wall, 1), "steps_s": steps, "failed": failed}


def validate(args: argparse.Namespace, model: Path) -> dict:
    wall, run = quantmill(args, model, "validate", "validate.offload_curve=true", "validate.enforce=false",
                          f"validate.max_tokens={args.max_tokens}", f"validate.offload_tokens={args.offload_tokens}")
    for name in ("report.json", "report.html"):
        found = args.work / "store" / "reports" / args.shape / name
        if found.is_file():
            shutil.copy(found, args.out / name)
    rows = {}
    for step in run["steps"]:
        r = step.get("result") or {}
        if step["step"] == "validate" and "status" in r:
            rows[step["spec_id"]] = {k: r.get(k) for k in (
                "status", "bits_per_weight", "mean_kld", "prompt_tokens_per_second", "generation_tokens_per_second",
                "peak_rss_bytes", "peak_gpu_memory_bytes", "execution", "energy")} | {"seconds": step["seconds"]}
    return {"wall_s": round(wall, 1), "validations": rows,
            "steps": [{"id": s["spec_id"], "status": s["status"], "seconds": s["seconds"]} for s in run["steps"]]}


def _calibration_set(args: argparse.Namespace, model: Path) -> None:
    """Without the pipeline stage's store (``--stages bare`` alone), make the calibration set the pipeline would:
    its plan's download and calibration-set steps, by the same step code, into the same store."""
    from quantmill.config import compose
    from quantmill.execute import run_step
    from quantmill.plan.build import plan
    from quantmill.plan.records import kind_of
    from quantmill.store import open_store

    cfg = compose([*_overrides(args, model), "validate.enabled=false"], conf_dir=HERE.parent / "conf")
    store, refs = open_store(cfg.store), {}
    for spec in plan(cfg, store):
        if kind_of(spec.step, spec.config).name in ("download", "dataset"):
            refs[spec.id] = run_step(spec, {n: refs[i] for n, i in spec.inputs.items()}, store).ref


def _store_file(store: Path, name: str) -> Path:
    return next(p for p in (store / "objects").glob(f"*/files/{name}"))


def bare(args: argparse.Namespace, model: Path) -> dict:
    """The same files by the bare tools, one after another; every process timed as a whole."""
    from gpu_quantizers import RECIPES as CALIBRATED
    from gpu_quantizers import bare as bare_calibrated

    from quantmill import constants as C
    from quantmill.toolchain.llamacpp import locate

    work = args.work / "bare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = args.work / "store"
    if not any(store.glob(f"objects/*/files/{C.CALIBRATION_TOKENS_FILE}")):
        _calibration_set(args, model)
    for name in (C.CALIBRATION_TOKENS_FILE, C.CALIBRATION_TEXT_FILE):  # what the pipeline calibrated on
        shutil.copy(_store_file(store, name), work / name)
    shutil.rmtree(store)
    seq_len, samples = _calibration_shape(work / C.CALIBRATION_TOKENS_FILE)
    recipes = args.recipes.split(",")
    build = locate() if any(r in GGUF for r in recipes) else None  # the calibrated recipes need no llama.cpp
    times: dict[str, float] = {}

    def timed(name: str, cmd: list, env: dict | None = None) -> None:
        start = time.perf_counter()
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=work,
                              env={**os.environ, **(env or {})})
        times[name] = round(time.perf_counter() - start, 1)
        print(f"bare {name}: {times[name]} s", flush=True)  # a lease that ends mid-stage still shows its steps
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed: {(done.stdout + done.stderr)[-3000:]}")

    start = time.perf_counter()
    if any(r in GGUF for r in recipes):
        timed("convert", [sys.executable, build.converter, model, "--outfile", "f16.gguf", "--outtype", "f16",
                          "--model-name", args.shape], env=build.converter_env())
    if any(GGUF.get(r) and GGUF[r][1] for r in recipes):
        timed("imatrix", [build.tool("llama-imatrix"), "-m", "f16.gguf", "-f", C.CALIBRATION_TEXT_FILE, "-o",
                          "imatrix.gguf", "-c", seq_len, "--chunks", samples, "--no-ppl", "-b", seq_len, "--seed", 0,
                          *build.offload_args()])
    for r in recipes:
        if GGUF.get(r):
            qtype, imatrix = GGUF[r]
            timed(r, [build.tool("llama-quantize"), *(["--imatrix", "imatrix.gguf"] if imatrix else []), "f16.gguf",
                      f"{qtype.lower()}.gguf", qtype])
    for r in recipes:
        if r in CALIBRATED:
            seconds, _, out, _ = bare_calibrated(model, work / C.CALIBRATION_TOKENS_FILE, r, work)
            times[r] = round(seconds, 1)
            print(f"bare {r}: {times[r]} s", flush=True)
    wall = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in work.glob("*.gguf")}
    shutil.rmtree(work)
    return {"wall_s": round(wall, 1), "steps_s": times, "gguf_bytes": sizes}


def _calibration_shape(tokens: Path) -> tuple[int, int]:
    from safetensors.numpy import load_file

    ids = load_file(str(tokens))["input_ids"]
    return int(ids.shape[1]), int(ids.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work", type=Path, default=HERE / "out" / "gpu-matrix")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--stages", default="pipeline,validate,bare")
    # 128 tokens a speed run: three of them pass NVML's one second at an 8B Q4_K_M's 250 tok/s
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--offload-tokens", type=int, default=32)
    args = parser.parse_args()
    stages = {"pipeline": pipeline, "validate": validate, "bare": bare}
    unknown = sorted(set(args.stages.split(",")) - set(stages))
    if unknown:
        parser.error(f"--stages {','.join(unknown)}: unknown; choose from {','.join(stages)}")
    import synthetic

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = synthetic.make(args.shape, args.work / args.shape, dtype=args.dtype)
    print(f"model {args.shape}: {time.perf_counter() - start:.0f} s", flush=True)
    results: dict = {}
    for stage in args.stages.split(","):
        results[stage] = stages[stage](args, model)
        if "pipeline" in results and "bare" in results:
            results["ratio"] = round(results["pipeline"]["wall_s"] / results["bare"]["wall_s"], 3)
        (args.out / "matrix.json").write_text(json.dumps(results, indent=1))
        print(stage, json.dumps(results[stage]), flush=True)
    if "ratio" in results:
        print(f"ratio {results['ratio']}")


if __name__ == "__main__":
    main()
