"""Calibrated quantizers on a CUDA GPU: the pipeline against a bare llm-compressor ``oneshot`` script.

For each synthetic shape and recipe, one after the other on the same machine: (1) a bare script that loads the
checkpoint, runs ``oneshot`` with the same modifier and 128 x 512 calibration tokens and saves compressed-tensors;
(2) ``quantmill run`` for that recipe (download, calibration set, quantize; validation and publishing off so both
do the same work), on a fresh store. Wall time of each whole process, peak GPU memory, output size.

    python bench/gpu_quantizers.py --shape llama-1.1b --recipes gptq_w4a16,awq_w4a16,fp8_dynamic,nvfp4 --out DIR
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
import json, sys, time, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.awq import AWQModifier
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
model_dir, calibration, method, scheme, out = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
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
model.save_pretrained(out, save_compressed=True)
print("PEAK", torch.cuda.max_memory_allocated() if cuda else 0)
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


def bench_one(shape: str, model: Path, recipe: str, work: Path, text: Path) -> dict:
    method, scheme, calibrated = RECIPES[recipe]
    store = work / f"store-{recipe}"
    base, extra = VARIANTS.get(recipe, (recipe, []))
    overrides = ["model=local", f"model.path={model}", f"model.name={shape}", f"recipe=[{base}]", *extra,
                 f"store.root={store}", f"infra.prefect_home={work / 'prefect'}", "validate.enabled=false",
                 "publish.enabled=false", f"calibration.num_samples={SAMPLES}", f"calibration.seq_len={SEQ_LEN}",
                 f"calibration.files=[{text}]", "calibration.min_samples=128"]
    # The pipeline first computes the calibration set; the bare script is fed the very same token ids.
    pipeline_s, _ = timed([sys.executable, "-m", "quantmill.cli", "run", *overrides])
    objects = store / "objects"
    quant = next(p for p in objects.glob("*/files") if (p / "quantmill.json").is_file()
                 and json.loads((p / "quantmill.json").read_text()).get("method") == method)
    result = json.loads((quant / "quantmill.json").read_text())
    cal = next((p / "calibration.safetensors" for p in objects.glob("*/files")
                if (p / "calibration.safetensors").is_file()), None)
    bare_out = work / f"bare-{recipe}"
    bare_s, log = timed([sys.executable, "-c", BARE, str(model), str(cal) if calibrated else "-", method, scheme,
                         str(bare_out)])
    bare_peak = int(next(line.split()[1] for line in log.splitlines() if line.startswith("PEAK")))
    row = {"shape": shape, "recipe": recipe, "bare_s": round(bare_s, 1), "pipeline_s": round(pipeline_s, 1),
           "ratio": round(pipeline_s / bare_s, 3), "bare_peak_gpu_gib": round(bare_peak / 2**30, 2),
           "pipeline_peak_gpu_gib": round((result.get("peak_gpu_bytes") or 0) / 2**30, 2),
           "bare_out_gb": round(out_bytes(bare_out) / 1e9, 3), "pipeline_out_gb": round(out_bytes(quant) / 1e9, 3),
           "bits_per_weight": result.get("bits_per_weight"), "device": result.get("device")}
    shutil.rmtree(bare_out, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-1.1b", choices=list(synthetic.SHAPES))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--models", default=None, help="where synthetic checkpoints are written")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qm-gpu-bench-"))
    model = synthetic.make(args.shape, Path(args.models or work) / args.shape)
    text = calibration_text(work)
    for recipe in args.recipes.split(","):
        try:
            row = bench_one(args.shape, model, recipe, work, text)
        except Exception as e:  # noqa: BLE001 - one failed recipe must not lose the others' rows
            row = {"shape": args.shape, "recipe": recipe, "error": str(e)[-1500:]}
        print(json.dumps(row), flush=True)
        with (out / "gpu_quantizers.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
