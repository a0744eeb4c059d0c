"""Calibrated quantizers on a CUDA GPU: the pipeline against a bare llm-compressor ``oneshot`` script.

For each synthetic shape and recipe, one after the other on the same machine: (1) a bare script that loads the
checkpoint, runs ``oneshot`` with the same modifier and 128 x 512 calibration tokens and saves compressed-tensors;
(2) ``quantmill run`` for that recipe (download, calibration set, quantize; validation and publishing off so both
do the same work), on a fresh store. Wall time of each whole process, peak GPU memory, output size.

    python bench/gpu_quantizers.py --shape llama-1.1b --recipes gptq_w4a16,awq_w4a16,fp8_dynamic,nvfp4 --out DIR
        [--server]     the pipeline runs against a running `quantmill server` (a team's setup) instead of
                       Prefect's temporary one
        [--together]   also all recipes in one pipeline run (one download, one calibration set) against the
                       bare scripts one after the other
        [--dtype bfloat16]  the synthetic checkpoint's dtype (Llama 3 ships bfloat16)
        [--warmup]     an untimed run of the pipeline and of the bare script first (one-time costs paid by neither)
        [--warmup-first]  the same, for the first recipe only (the machine's caches warm; saves device time)
        [--pipeline-only]  no bare script (keeps the calibration set beside the checkpoint for --bare-only)
        [--shared-store [DIR]]  one store for the shape's recipes (DIR to keep it across calls): the source's
                       sha256 and the calibration set made once (by the warm-up, else by the first recipe), as
                       when a team adds a recipe to a model
        [--bare-only]  the bare script alone, on the calibration set a --pipeline-only run kept (device calls are
                       limited to 10 minutes: the 8B AWQ pair is run as two calls)

Each pipeline row also carries its steps' own times (from the provenance records), so what the pipeline adds
is visible: download (copy + sha256 of the source), the calibration set, hashing and committing the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent

import synthetic  # noqa: E402

SAMPLES, SEQ_LEN = 128, 512

# The bare script: what a user writes by hand with llm-compressor for the same recipe.
BARE = r'''
import json, sys, time
T0 = time.perf_counter()
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.awq import AWQModifier
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
phases, last = {}, T0
def mark(name):
    global last
    now = time.perf_counter()
    phases[name], last = round(now - last, 2), now
mark("imports")
model_dir, calibration, method, scheme, out = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
mark("load")
kwargs = {}
if calibration != "-":
    ids = load_file(calibration)["input_ids"].tolist()
    kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
                  max_seq_length=len(ids[0]), num_calibration_samples=len(ids))
modifier = {"gptq": GPTQModifier, "awq": AWQModifier}.get(method, QuantizationModifier)
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.reset_peak_memory_stats()
oneshot(model=model, recipe=[modifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])], **kwargs)
mark("oneshot")
model.save_pretrained(out, save_compressed=True)
mark("save")
print("PEAK", torch.cuda.max_memory_allocated() if cuda else 0)
print("PHASES", json.dumps(phases))
'''

RECIPES = {"gptq_w4a16": ("gptq", "W4A16", True), "awq_w4a16": ("awq", "W4A16", True),
           "fp8_dynamic": ("fp8", "FP8_DYNAMIC", False), "nvfp4": ("nvfp4", "NVFP4", True),
           "awq_w4a16_asym": ("awq", "W4A16_ASYM", True)}
# Variants run as a shipped recipe plus overrides.
VARIANTS = {"awq_w4a16_asym": ("awq_w4a16", ["recipe.awq_w4a16.quant_type=W4A16_ASYM"])}


def calibration_text(work: Path) -> Path:
    """Enough text for 128 x 512 tokens: the bundled calibration text, three times."""
    text = (REPO / "quantmill" / "bundled" / "text" / "calibration.txt").read_text()
    path = work / "calibration-x3.txt"
    path.write_text("\n\n".join([text] * 3))
    return path


def out_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {(done.stdout + done.stderr)[-3000:]}")
    return seconds, done.stdout + done.stderr


def pipeline_overrides(shape: str, model: Path, recipes: list[str], store: Path, work: Path, text: Path) -> list[str]:
    extra = [o for r in recipes for o in VARIANTS.get(r, (r, []))[1]]
    names = ",".join(VARIANTS.get(r, (r, []))[0] for r in recipes)
    return ["model=local", f"model.path={model}", f"model.name={shape}", f"recipe=[{names}]", *extra,
            f"store.root={store}", f"infra.prefect_home={work / 'prefect'}", "validate.enabled=false",
            "publish.enabled=false", f"calibration.num_samples={SAMPLES}", f"calibration.seq_len={SEQ_LEN}",
            f"calibration.files=[{text}]", "calibration.min_samples=128"]


def step_seconds(store: Path) -> dict[str, float]:
    """Each artifact's step and how long its step function ran, from its provenance record."""
    from quantmill.store import provenance

    out = {}
    for record in (store / "objects").glob("*/provenance.json"):
        stmt = json.loads(record.read_text())
        spec = stmt["predicate"]["buildDefinition"]["externalParameters"]["spec"]
        out[spec] = round(provenance.seconds_of(stmt), 2)
    return out


def quantized_dir(store: Path, method: str) -> Path:
    return next(p for p in (store / "objects").glob("*/files") if (p / "quantmill.json").is_file()
                and json.loads((p / "quantmill.json").read_text()).get("method") == method)


def calibration_file(store: Path) -> Path | None:
    return next((p / "calibration.safetensors" for p in (store / "objects").glob("*/files")
                 if (p / "calibration.safetensors").is_file()), None)


def bare(model: Path, cal: Path | None, recipe: str, work: Path) -> tuple[float, int, Path, dict]:
    """The bare script for ``recipe``, fed the very calibration token ids the pipeline made (``cal``)."""
    method, scheme, calibrated = RECIPES[recipe]
    bare_out = work / f"bare-{recipe}"
    seconds, log = timed([sys.executable, "-c", BARE, str(model), str(cal) if calibrated else "-", method, scheme,
                          str(bare_out)])
    peak = int(next(line.split()[1] for line in log.splitlines() if line.startswith("PEAK")))
    phases = json.loads(next(line.split(" ", 1)[1] for line in log.splitlines() if line.startswith("PHASES ")))
    return seconds, peak, bare_out, phases


def bare_row(shape: str, model: Path, cal: Path | None, recipe: str, work: Path) -> dict:
    bare_s, bare_peak, bare_out, bare_phases = bare(model, cal, recipe, work)
    row = {"shape": shape, "recipe": recipe, "bare_s": round(bare_s, 1), "bare_phases_s": bare_phases,
           "bare_peak_gpu_gib": round(bare_peak / 2**30, 2), "bare_out_gb": round(out_bytes(bare_out) / 1e9, 3)}
    shutil.rmtree(bare_out, ignore_errors=True)
    return row


def drop_quantized(store: Path, method: str) -> None:
    """Delete the quantized artifact from a shared store, so the next run of the recipe quantizes again."""
    from quantmill.store.local import LocalStore

    LocalStore(store).delete(quantized_dir(store, method).parent.name)


def bench_one(shape: str, model: Path, recipe: str, work: Path, text: Path, env: dict[str, str],
              pipeline_only: bool = False, warmup: bool = False, keep_calibration: Path | None = None,
              shared: Path | None = None) -> dict:
    method = RECIPES[recipe][0]
    store = shared or work / f"store-{recipe}"
    command = [sys.executable, "-m", "quantmill.cli", "run", *pipeline_overrides(shape, model, [recipe], store, work, text)]
    if warmup:  # the first processes on a fresh machine pay one-time costs (kernel caches): neither side is timed
        timed(command, env)
        if not pipeline_only:
            shutil.rmtree(bare(model, calibration_file(store), recipe, work)[2], ignore_errors=True)
        if shared:
            drop_quantized(store, method)
        else:
            shutil.rmtree(store, ignore_errors=True)
    # The pipeline first computes the calibration set (unless a shared store has it); the bare script is fed the
    # very same token ids.
    before = step_seconds(store) if store.exists() else {}
    pipeline_s, _ = timed(command, env)
    if keep_calibration is not None and calibration_file(store):  # for a later --bare-only
        shutil.copyfile(calibration_file(store), keep_calibration)
    quant = quantized_dir(store, method)
    result = json.loads((quant / "quantmill.json").read_text())
    row = {"shape": shape, "recipe": recipe, "pipeline_s": round(pipeline_s, 1), "server": bool(env),
           "warmup": warmup, "pipeline_peak_gpu_gib": round((result.get("peak_gpu_bytes") or 0) / 2**30, 2),
           "pipeline_out_gb": round(out_bytes(quant) / 1e9, 3), "bits_per_weight": result.get("bits_per_weight"),
           "shards": len([p for p in quant.glob("*.safetensors") if not p.name.startswith("quantmill")]),
           "hashed_while_writing": len(result.get("hashed_while_writing", [])),
           "device": result.get("device"), "pipeline_phases_s": result.get("phases_s"),
           "store": "shared" if shared else "fresh",
           "steps_s": {k: v for k, v in step_seconds(store).items() if k not in before},
           "cached": sorted(before)}
    if not pipeline_only:
        row.update(bare_row(shape, model, calibration_file(store), recipe, work))
        row["ratio"] = round(pipeline_s / row["bare_s"], 3)
    if shared:
        drop_quantized(store, method)
    else:
        shutil.rmtree(store, ignore_errors=True)
    return row


def bench_together(shape: str, model: Path, recipes: list[str], work: Path, text: Path, env: dict[str, str]) -> dict:
    """All recipes in one pipeline run (download and calibration once) against the bare scripts in a row."""
    store = work / "store-together"
    pipeline_s, _ = timed([sys.executable, "-m", "quantmill.cli", "run",
                           *pipeline_overrides(shape, model, recipes, store, work, text)], env)
    bare_s = 0.0
    for recipe in recipes:
        seconds, _, out, _ = bare(model, calibration_file(store), recipe, work)
        bare_s += seconds
        shutil.rmtree(out, ignore_errors=True)
    row = {"shape": shape, "recipe": "+".join(recipes), "bare_s": round(bare_s, 1), "pipeline_s": round(pipeline_s, 1),
           "ratio": round(pipeline_s / bare_s, 3), "server": bool(env), "steps_s": step_seconds(store)}
    shutil.rmtree(store, ignore_errors=True)
    return row


def start_server(work: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """`quantmill server` on a free port (SQLite), as a team runs one; the environment pointing runs at it."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "server", "--port", str(port), "--home",
                             str(work / "server")], stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, {"PREFECT_API_URL": url}
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the Prefect server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-1.1b", choices=list(synthetic.SHAPES))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--models", default=None, help="where synthetic checkpoints are written")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--server", action="store_true")
    parser.add_argument("--together", action="store_true")
    parser.add_argument("--pipeline-only", action="store_true", help="no bare script (device time is short)")
    parser.add_argument("--warmup", action="store_true", help="an untimed run of each side first")
    parser.add_argument("--bare-only", action="store_true", help="the bare script on a kept calibration set")
    parser.add_argument("--warmup-first", action="store_true", help="--warmup for the first recipe only")
    parser.add_argument("--shared-store", nargs="?", const="", default=None, metavar="DIR",
                        help="one store for all recipes of the shape: download and calibration made once, as a team "
                             "adding recipes to a model has them (the first recipe, or the warm-up, makes them)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qm-gpu-bench-"))
    suffix = "" if args.dtype == "float16" else "-bf16"
    model = synthetic.make(args.shape, Path(args.models or work) / (args.shape + suffix), dtype=args.dtype)
    text = calibration_text(work)
    server, env = start_server(work) if args.server else (None, {})
    recipes = args.recipes.split(",")

    def record(row: dict) -> None:
        row = {**row, "dtype": args.dtype}
        print(json.dumps(row), flush=True)
        with (out / "gpu_quantizers.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        kept = model.parent / f"{model.name}-calibration.safetensors"
        shared = None if args.shared_store is None else Path(args.shared_store or work / "store-shared")
        for i, recipe in enumerate(recipes):
            warmup = args.warmup or (args.warmup_first and i == 0)
            try:
                if args.bare_only:
                    record(bare_row(args.shape, model, kept if RECIPES[recipe][2] else None, recipe, work))
                    continue
                record(bench_one(args.shape, model, recipe, work, text, env, args.pipeline_only, warmup,
                                 keep_calibration=kept if args.pipeline_only else None, shared=shared))
            except Exception as e:  # noqa: BLE001 - one failed recipe must not lose the others' rows
                record({"shape": args.shape, "recipe": recipe, "error": str(e)[-1500:]})
        if args.together:
            record(bench_together(args.shape, model, recipes, work, text, env))
    finally:
        if server:
            server.terminate()


if __name__ == "__main__":
    main()
