"""Benchmark on an NVIDIA GPU: the pinned llama.cpp built with CUDA, an 8B-shape Llama as F16 and Q4_K_M,
generation and prompt speed over a sweep of offloaded layers (the VRAM wall), peak GPU and host memory, and joules
per token from NVML's energy counter.

Three stages, each one device call (a warm machine keeps the outputs under .gpu-work/ between calls):

    python3 bench/gpu_llamacpp.py build     # llama.cpp with CUDA from the carried tree (.gpu-carry-cuda)
    python3 bench/gpu_llamacpp.py models    # synthetic 8B safetensors -> F16 GGUF -> Q4_K_M (imatrix on the GPU)
    python3 bench/gpu_llamacpp.py sweep f16 # llama-bench per offload, energy, memory -> $OUT/gpu_llamacpp-f16.json

Joules per token are marginal: each configuration runs twice, with R1 and R2 repetitions, and the energy and time of
the difference are divided by the difference in tokens, so model loading and warm-up cancel out (they are the same
in both runs). NVML counts the GPU board only; the host CPU has no energy counter on the machines measured here, so
partially offloaded runs say "GPU only". Here (a machine without CUDA) the same script prepares the carry folder:

    python bench/gpu_llamacpp.py carry      # .gpu-carry-cuda/llama-src.txz with ggml-cuda, and BUILD_INFO.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
WORK = REPO / ".gpu-work"
CARRY = REPO / ".gpu-carry-cuda"
BUILD = WORK / "llama"
ARCHS = os.environ.get("LLAMA_CPP_CUDA_ARCHS", "90")  # the bench machine's only; the product build lists more
TARGETS = ["llama-quantize", "llama-imatrix", "llama-bench", "llama"]
OFFLOAD = [33, 24, 16, 8, 0]  # all 32 layers and the output, 3/4, 1/2, 1/4, none
FILES = ["f16", "q4_k_m"]


def carry() -> None:
    """Here: the pinned tree with its CUDA backend, for the device machine (which cannot download it)."""
    from bench.gpu_carry import llama_tree

    llama_tree(CARRY, cuda=True)


def build() -> None:
    src = WORK / "src"
    if not (src / "llama.cpp").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xf", str(CARRY / "llama-src.txz"), "-C", str(src)], check=True)
    flags = subprocess.run(["bash", "-c", ". scripts/llama-cpp-flags.sh && printf '%s\\n' "
                            "\"${LLAMA_CPP_CMAKE_FLAGS[@]}\""], cwd=REPO, capture_output=True, text=True,
                           check=True, env={**os.environ, "LLAMA_CPP_CUDA_ARCHS": ARCHS}).stdout.split()
    start = time.perf_counter()
    subprocess.run(["cmake", "-S", str(src / "llama.cpp"), "-B", str(BUILD), "-G", "Ninja", *flags],
                   check=True, env={**os.environ, "CC": "/usr/bin/gcc", "CXX": "/usr/bin/g++"},
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count()), "--target", *TARGETS], check=True,
                   stdout=subprocess.DEVNULL)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    (WORK / "build.json").write_text(json.dumps({"flags": flags, "nvcc": nvcc,
                                                  "seconds": round(time.perf_counter() - start, 1)}))
    print(f"built in {time.perf_counter() - start:.0f} s with {nvcc}")


def tool(name: str) -> str:
    return str(BUILD / "bin" / name)


def models() -> None:
    from bench.synthetic import make

    start = time.perf_counter()
    src = make("llama-8b", WORK / "llama-8b")
    made = {"synthetic_s": round(time.perf_counter() - start, 1)}
    gguf = WORK / "llama-8b-f16.gguf"
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(WORK / "src" / "llama.cpp" / "gguf-py")}
    subprocess.run([sys.executable, str(WORK / "src" / "llama.cpp" / "convert_hf_to_gguf.py"), str(src), "--outfile",
                    str(gguf), "--outtype", "f16"], check=True, env=env, stdout=subprocess.DEVNULL)
    made["convert_s"] = round(time.perf_counter() - t, 1)
    text = WORK / "calibration.txt"
    text.write_text((REPO / "quantmill" / "bundled" / "text" / "calibration.txt").read_text())
    t = time.perf_counter()  # the importance matrix on the GPU: every layer offloaded
    subprocess.run([tool("llama-imatrix"), "-m", str(gguf), "-f", str(text), "-o", str(WORK / "imatrix.gguf"),
                    "-c", "512", "--chunks", "16", "-ngl", "99", "--no-ppl"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    made["imatrix_gpu_s"] = round(time.perf_counter() - t, 1)
    shutil.rmtree(src)  # the disk holds the F16 GGUF and its quants, not the checkpoint too
    for qtype in ("Q4_K_M",):
        t = time.perf_counter()
        subprocess.run([tool("llama-quantize"), "--imatrix", str(WORK / "imatrix.gguf"), str(gguf),
                        str(WORK / f"llama-8b-{qtype.lower()}.gguf"), qtype, str(os.cpu_count())], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        made[f"quantize_{qtype.lower()}_s"] = round(time.perf_counter() - t, 1)
    (WORK / "models.json").write_text(json.dumps(made))
    print(made)


class GpuMemory(threading.Thread):
    """Peak GPU memory in use while a run lasts, sampled from NVML every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.pynvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.base = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.peak, self.stop = self.base, threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def bench_once(model: Path, ngl: int, prompt: int, gen: int, reps: int) -> dict:
    from quantmill.toolchain.energy import EnergyMeter

    meter = EnergyMeter(("gpu", "cpu"))
    memory = GpuMemory()
    memory.start()
    meter.start()
    proc = subprocess.Popen([tool("llama-bench"), "-m", str(model), "-ngl", str(ngl), "-p", str(prompt), "-n",
                             str(gen), "-r", str(reps), "-fa", "on", "-t", str(os.cpu_count()), "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    spent = meter.joules()
    memory.stop.set()
    memory.join()
    if status != 0:
        raise RuntimeError(f"llama-bench failed on {model.name} ngl={ngl}")
    tests = json.loads(out)
    return {"joules": spent["joules"], "seconds": spent["seconds"], "tests": tests,
            "gpu_peak_bytes": memory.peak - memory.base, "host_peak_rss_bytes": usage.ru_maxrss * 1024,
            "counters": [c.name for c in meter.counters]}


def marginal(model: Path, ngl: int, *, prompt: int, gen: int, r1: int, r2: int) -> dict:
    a, b = bench_once(model, ngl, prompt, gen, r1), bench_once(model, ngl, prompt, gen, r2)
    tokens = (prompt + gen) * (r2 - r1)
    test = b["tests"][0]
    return {"tokens_per_second": test["avg_ts"], "stddev": test["stddev_ts"],
            "joules_per_token": (b["joules"] - a["joules"]) / tokens,
            "gpu_peak_bytes": max(a["gpu_peak_bytes"], b["gpu_peak_bytes"]),
            "host_peak_rss_bytes": max(a["host_peak_rss_bytes"], b["host_peak_rss_bytes"]),
            "counters": b["counters"]}


def sweep(files: list[str] = FILES, offload: list[int] = OFFLOAD) -> dict:
    """One row per file and offload; written to $OUT/gpu_llamacpp-<files>.json (one device call per file fits)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    name = pynvml.nvmlDeviceGetName(handle)
    results = {"device": name.decode() if isinstance(name, bytes) else name,
               "driver": pynvml.nvmlSystemGetDriverVersion(), "date": time.strftime("%Y-%m-%d"),
               "cpus": os.cpu_count(), "build": json.loads((WORK / "build.json").read_text()),
               "models": json.loads((WORK / "models.json").read_text()), "runs": []}
    out = Path(os.environ.get("OUT", WORK))
    for f in files:
        model = WORK / f"llama-8b-{f}.gguf"
        for ngl in offload:
            full = ngl == offload[0]
            # fewer repetitions where the CPU does most of the work: the same method, a shorter run
            gen = {True: 128, False: 32}[ngl >= 24]
            row = {"file": f, "size_bytes": model.stat().st_size, "ngl": ngl,
                   "generation": marginal(model, ngl, prompt=0, gen=gen, r1=1, r2=3 if ngl >= 16 else 2),
                   "prompt": marginal(model, ngl, prompt=512, gen=0, r1=1, r2=4 if full else 2)}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            # after every row: a call stopped at its time limit still brings back what it measured
            (out / f"gpu_llamacpp-{'-'.join(files)}.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "sweep"
    if stage == "sweep":
        sweep(sys.argv[2:] or FILES)
    else:
        {"carry": carry, "build": build, "models": models}[stage]()
