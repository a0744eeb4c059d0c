"""What this machine is and offers (the class its measurements are attributed to, its GPUs), and the preflight
check of a recipe's hardware needs against it."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from quantmill import constants as C
from quantmill.errors import PreflightError


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    compute_capability: float


@lru_cache(maxsize=1)
def cuda_gpus() -> tuple[Gpu, ...]:
    """The CUDA devices torch sees (none where torch has no CUDA build or no driver)."""
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(p.name, round(p.total_memory / 2**30, 1), float(f"{p.major}.{p.minor}")))
    return tuple(gpus)


def describe_needs(requires) -> str:
    parts = []
    if requires.min_compute_capability:
        parts.append(f"compute capability >= {requires.min_compute_capability}")
    if requires.min_gpu_memory_gb:
        parts.append(f">= {requires.min_gpu_memory_gb:g} GiB")
    return "a CUDA GPU" + (f" ({', '.join(parts)})" if parts else "")


def check_here(name: str, requires, *, pools: str = "") -> None:
    """Refuse, before any download, a recipe whose quantizer needs hardware this machine lacks.

    ``pools`` names the configured pools that offer it, for the message.
    """
    if requires.device not in (C.CUDA, C.CPU, "any"):
        raise PreflightError(f"recipe {name!r}: requires.device {requires.device!r} unknown; choose cuda, cpu or any")
    if requires.device != C.CUDA:
        return
    where = pools or "run it on a machine with one, or with infra=prefect on a worker of a pool offering 'cuda'"
    gpus = cuda_gpus()
    if not gpus:
        raise PreflightError(f"recipe {name!r} needs {describe_needs(requires)}; this machine has none; {where}")
    best = max(gpus, key=lambda g: (g.compute_capability, g.memory_gb))
    if requires.min_compute_capability and best.compute_capability < requires.min_compute_capability:
        raise PreflightError(f"recipe {name!r} needs {describe_needs(requires)}; this machine's {best.name} has "
                             f"compute capability {best.compute_capability}; {where}")
    if requires.min_gpu_memory_gb and best.memory_gb < requires.min_gpu_memory_gb:
        raise PreflightError(f"recipe {name!r} needs {describe_needs(requires)}; this machine's {best.name} has "
                             f"{best.memory_gb} GiB; {where}")


def check_capability(capability: str, *, min_gpu_memory_gb: float | None = None) -> str:
    """Check that this machine really offers ``capability``; return what it found, or raise one line saying why not.

    What each capability means is what the backends that declare it need: ``cpu`` any Python with quantmill,
    ``cuda`` an NVIDIA GPU visible to torch, ``mlx`` the mlx package importable, ``llamacpp`` the project's pinned
    llama.cpp build with its tools, ``onnx`` ONNX Runtime and ONNX Runtime GenAI importable; ``llamacpp-cuda`` and
    ``onnx-cuda`` the same with their CUDA backends and an NVIDIA GPU.
    """
    if capability == C.CPU:
        import os

        return f"{os.cpu_count()} CPU cores"
    if capability == C.CUDA:
        gpus = cuda_gpus()
        if not gpus:
            raise PreflightError("capability 'cuda': torch sees no CUDA device here (no GPU, no driver, or a CPU-only "
                                 "torch); start this worker on a GPU machine")
        best = max(gpus, key=lambda g: g.memory_gb)
        if min_gpu_memory_gb and best.memory_gb < min_gpu_memory_gb:
            raise PreflightError(f"capability 'cuda': the pool asks for {min_gpu_memory_gb:g} GiB of GPU memory, this "
                                 f"machine's {best.name} has {best.memory_gb} GiB")
        return ", ".join(f"{g.name} ({g.memory_gb} GiB, cc {g.compute_capability})" for g in gpus)
    if capability == C.MLX:
        try:
            import mlx.core as mx
        except ImportError as e:
            raise PreflightError(f"capability 'mlx': mlx is not importable ({e}); pip install 'quantmill[mlx]'") from None
        return f"mlx {getattr(mx, '__version__', '?')} on {mx.default_device()}"
    if capability == C.LLAMACPP:
        from quantmill.toolchain.llamacpp import locate

        build = locate()
        for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
            build.tool(tool)
        if not build.converter.is_file():
            raise PreflightError(f"capability 'llamacpp': converter {build.converter} missing; run `make llama-cpp`")
        return build.version
    if capability == C.ONNX:
        try:
            import onnxruntime
            import onnxruntime_genai
        except ImportError as e:
            raise PreflightError(f"capability 'onnx': {e.name} is not importable; pip install 'quantmill[onnx]'") \
                from None
        return f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}"
    if capability == C.LLAMACPP_CUDA:
        from quantmill.toolchain.llamacpp import locate

        found = check_capability(C.LLAMACPP)
        build = locate()
        if not build.cuda:
            raise PreflightError(f"capability 'llamacpp-cuda': the llama.cpp build in {build.root} has no CUDA backend "
                                 f"({build.build_info['cmake_flags']}); rebuild it with LLAMA_CPP_CUDA_ARCHS=\"80;86;89;90\" "
                                 f"make llama-cpp, or drop llamacpp-cuda from the pool")
        return f"{found}, on {_nvidia_gpu('llamacpp-cuda')}"
    if capability == C.ONNX_CUDA:
        check_capability(C.ONNX)
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise PreflightError(f"capability 'onnx-cuda': onnxruntime {onnxruntime.__version__} here has no CUDA "
                                 f"execution provider (it has {', '.join(providers)}); install onnxruntime-gpu and "
                                 f"onnxruntime-genai-cuda in place of onnxruntime and onnxruntime-genai")
        return f"onnxruntime {onnxruntime.__version__} CUDAExecutionProvider, on {_nvidia_gpu('onnx-cuda')}"
    raise PreflightError(f"capability {capability!r} unknown; known: {', '.join(C.CAPABILITIES)}")


def _nvidia_gpu(capability: str) -> str:
    """The GPU a CUDA build would run on, named by the driver (nvidia-smi), without importing torch."""
    gpu = gpu_details().get("gpu")
    if not gpu:
        raise PreflightError(f"capability {capability!r}: no NVIDIA GPU visible here (nvidia-smi found none); start "
                             f"this worker on a GPU machine")
    return gpu


@lru_cache(maxsize=1)
def gpu_details() -> dict[str, str]:
    """GPU model, driver and CUDA version for provenance, from nvidia-smi (no torch import); empty without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        header = subprocess.run([smi], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [r.strip() for r in out.splitlines() if r.strip()]
    if not rows:
        return {}
    name, driver, memory = (p.strip() for p in rows[0].split(","))
    found = re.search(r"CUDA Version:\s*([\d.]+)", header)
    cuda = found.group(1) if found else ""
    return {"gpu": f"{name} x{len(rows)}" if len(rows) > 1 else name, "gpu_memory": memory, "gpu_driver": driver,
            **({"cuda": cuda} if cuda else {})}


def cpu_model() -> str:
    """The CPU's model name (what a speed measurement is attributable to)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_class() -> str:
    """What measurements depend on: architecture, CPU model and core count (not the host name)."""
    return f"{platform.machine()} {cpu_model()} x{os.cpu_count()}"


def machine_info() -> dict[str, str]:
    """What a measurement ran on (no host name: records that hold it travel between machines)."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        **({"gpu": gpu} if (gpu := gpu_details().get("gpu")) else {}),
    }


def host_info() -> dict[str, str]:
    """machine_info plus the host name and GPU (model, driver, CUDA), for provenance run details."""
    return {"hostname": socket.gethostname(), **machine_info(), **gpu_details()}
