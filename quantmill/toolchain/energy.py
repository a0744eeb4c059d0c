"""Energy read from the hardware's own counters, never estimated.

- NVIDIA GPUs: NVML's total-energy counter (millijoules since the driver loaded; ``nvidia-ml-py``), per device.
- x86 CPUs: RAPL through the powercap interface (``/sys/class/powercap/intel-rapl:N/energy_uj``, microjoules, the
  package domains; AMD exposes its counters there too), where the file is readable (often root only).

``EnergyMeter`` reads every counter this machine offers at the start and end of a span; ``joules()`` is the
difference, with RAPL's wrap-around undone. Where there is none, ``available`` is false and ``reason`` says why,
and the record says "not available" rather than a guess.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

POWERCAP = Path(os.environ.get("QUANTMILL_POWERCAP_ROOT", "/sys/class/powercap"))


@dataclass
class Counter:
    """One monotonic energy counter: ``read`` gives joules; ``wrap`` is the joules at which it restarts (or None)."""

    name: str
    read: Callable[[], float]
    wrap: float | None = None


def rapl_counters(root: Path | None = None) -> tuple[list[Counter], str | None]:
    """The package-level RAPL domains (``intel-rapl:N``; their subdomains are parts of them), or why none."""
    root = POWERCAP if root is None else root
    if not root.is_dir():
        return [], f"no powercap interface ({root})"
    counters, unreadable = [], []
    for domain in sorted(root.glob("intel-rapl:*")):
        if domain.name.count(":") != 1 or not (domain / "energy_uj").exists():
            continue
        energy = domain / "energy_uj"
        try:
            float(energy.read_text())
        except (OSError, ValueError):
            unreadable.append(domain.name)
            continue
        limit = domain / "max_energy_range_uj"
        wrap = float(limit.read_text()) / 1e6 if limit.is_file() else None
        label = (domain / "name").read_text().strip() if (domain / "name").is_file() else domain.name
        counters.append(Counter(f"rapl {label}", lambda e=energy: float(e.read_text()) / 1e6, wrap))
    if counters:
        return counters, None
    if unreadable:
        return [], f"RAPL counters not readable by this user ({', '.join(unreadable)})"
    return [], "no RAPL package domain under powercap"


def nvml_counters(devices: list[int] | None = None) -> tuple[list[Counter], str | None]:
    """NVML's total-energy counter of each visible NVIDIA GPU (or of ``devices``), or why none."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as e:
        return [], f"NVML unavailable ({e})"
    counters = []
    for i in devices if devices is not None else range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as e:
            return [], f"GPU {i} has no NVML energy counter ({e})"
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        counters.append(Counter(f"nvml {i} {name}",
                                lambda h=handle: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3))
    return counters, None if counters else "no NVIDIA GPU"


@dataclass
class EnergyMeter:
    """Joules over a span, from every counter of the kinds asked for (``gpu``: NVML; ``cpu``: RAPL)."""

    kinds: tuple[str, ...] = ("gpu", "cpu")
    counters: list[Counter] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    _start: list[float] = field(default_factory=list)
    _t0: float = 0.0

    def __post_init__(self) -> None:
        for kind, find in (("gpu", nvml_counters), ("cpu", rapl_counters)):
            if kind in self.kinds:
                found, why = find()
                self.counters += found
                if why:
                    self.reasons.append(why)

    @property
    def available(self) -> bool:
        return bool(self.counters)

    @property
    def reason(self) -> str:
        return "not available on this machine: " + "; ".join(self.reasons)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = [c.read() for c in self.counters]

    def joules(self) -> dict[str, Any]:
        """Energy since ``start`` per counter and in total, and the seconds it covers."""
        seconds = time.perf_counter() - self._t0
        per = {}
        for counter, before in zip(self.counters, self._start):
            delta = counter.read() - before
            if delta < 0 and counter.wrap:
                delta += counter.wrap
            per[counter.name] = delta
        return {"joules": sum(per.values()), "per_counter": per, "seconds": seconds}


# NVML's counter moves in steps (tens of milliseconds on the GPUs measured): spans shorter than this in total read
# as no energy at all, so they are reported as too short rather than as zero.
MIN_SECONDS = 1.0


def per_token(meter: EnergyMeter, spans: dict[str, tuple[float, int, float]]) -> dict[str, Any]:
    """The record's ``energy``: joules per token of each span (``name -> (joules, tokens, seconds)``), the counters
    used, or why there are none."""
    if not meter.available:
        return {"available": False, "detail": meter.reason}
    out: dict[str, Any] = {"available": True, "counters": [c.name for c in meter.counters]}
    short = []
    for name, (joules, tokens, seconds) in spans.items():
        if not tokens:
            out[f"joules_per_{name}_token"] = None
        elif seconds < MIN_SECONDS or joules <= 0:
            out[f"joules_per_{name}_token"] = None
            short.append(f"{name} {seconds:.2f} s")
        else:
            out[f"joules_per_{name}_token"] = float(f"{joules / tokens:.3g}")
    if short:
        out["detail"] = f"too short to read from the counters ({', '.join(short)}; at least {MIN_SECONDS:g} s needed)"
    return out


class GpuMemoryPeak:
    """The peak of GPU memory in use on the visible NVIDIA GPUs above what was in use when it started, sampled by
    NVML every ``interval`` seconds on a thread of its own (the runtimes allocate outside torch's accounting, so
    the driver's figure is the one every runtime shares). ``peak_bytes`` is None where there is no NVML."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_bytes = interval, None
        self._handles: list[Any] = []
        self._stop = None

    def _used(self) -> int:
        import pynvml

        return sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)

    def __enter__(self) -> "GpuMemoryPeak":
        import threading

        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver, no GPU: nothing to sample
            return self
        if not self._handles:
            return self
        base, self.peak_bytes = self._used(), 0
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, self._used() - base)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
