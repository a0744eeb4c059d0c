"""Benchmark (device machine): the whole format matrix of one synthetic shape in one ``quantmill run`` on a GPU.

GGUF F16, Q8_0 and Q4_K_M (importance matrix, validations and the layer-offload curve in llama.cpp on the GPU),
AWQ and GPTQ W4A16, FP8 and NVFP4 (llm-compressor on the GPU, validated in transformers there), every artifact
validated with its speed, host and GPU peak memory and joules per token (NVML). Prepare the machine first: a carry
with llm-compressor's wheels (``bench/gpu_carry.py`` without ``--pools``) and llama.cpp's tree with ggml-cuda
(``bench/gpu_llamacpp.py carry``), then ``LLAMA_CPP_CUDA_ARCHS=90 CARRY=... . bench/gpu-setup.sh``. ``--recipes``
narrows the matrix (the GGUF recipes need no llm-compressor).

    python3 bench/gpu_matrix.py [--shape llama-1.1b] [--dtype bfloat16] [--recipes a,b] --out DIR

Writes DIR/run.json (the run's steps), DIR/report.json and report.html, and prints one line per artifact.
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
RECIPES = ["gguf_f16", "gguf_q8_0", "gguf_q4_k_m", "awq_w4a16", "gptq_w4a16", "fp8_dynamic", "nvfp4"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-1.1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work", default=str(HERE / "out" / "gpu-matrix"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import synthetic

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = synthetic.make(args.shape, work / args.shape, dtype=args.dtype)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", "--json", "model=local",
                           f"model.path={model}", f"model.name={args.shape}", f"recipe=[{args.recipes}]",
                           "validate.offload_curve=true", "validate.max_tokens=224", "validate.enforce=false",
                           "publish.enabled=false", "infra.server=temporary", f"store.root={work / 'store'}",
                           "--config-dir", str(HERE.parent / "conf")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    (out / "run.log").write_text(done.stderr[-20000:])
    if not done.stdout.strip():
        print(done.stderr[-3000:])
        raise SystemExit(f"quantmill run gave no result (exit {done.returncode})")
    run = json.loads(done.stdout)
    (out / "run.json").write_text(json.dumps({"wall_s": round(wall, 1), **run}, indent=1))
    for name in ("report.json", "report.html"):
        found = work / "store" / "reports" / args.shape / name
        if found.is_file():
            shutil.copy(found, out / name)
    print(f"wall {wall:.1f} s, exit {done.returncode}")
    for step in run["steps"]:
        r = step.get("result") or {}
        if step["step"] == "validate" and "status" in r:
            print(step["spec_id"], r["status"], r.get("bits_per_weight"), r.get("mean_kld"),
                  r.get("prompt_tokens_per_second"), r.get("generation_tokens_per_second"),
                  r.get("peak_rss_bytes"), r.get("peak_gpu_memory_bytes"), step["seconds"])
        else:
            print(step["spec_id"], step["status"], step["seconds"], step.get("error") or "")


if __name__ == "__main__":
    main()
