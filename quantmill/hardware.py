"""What this machine offers, and the preflight check of a recipe's hardware needs against it."""

from __future__ import annotations

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

    ``pools`` names the configured pools that offer it (issue: worker pools), for the message.
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
