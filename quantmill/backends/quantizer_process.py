"""The quantizer process: ``python -m quantmill.backends.quantizer_process REQUEST.json`` runs one calibrated
quantization (its backend module's ``run``) and writes its result, or one line of error, beside the request.

Started with ``--wait MODULE`` it imports its backend's libraries first and reads the request file's path from
stdin later (``calibrated.prestarted``). What the backends call from inside it (phase marks, the layer an
out-of-memory error hit, the probe file) lives here too.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from quantmill import constants as C

ERROR_FILE = "error.json"
PROBE_TOKENS, PROBE_POSITIONS = 32, 4
# Caps the quantizer process's share of the GPU (workers sharing one GPU); a tiny share provokes a real OOM in tests.
ENV_CUDA_MEMORY_FRACTION = "QUANTMILL_CUDA_MEMORY_FRACTION"
REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"


class LayerTracker:
    """Remembers which decoder layer ran last, so an out-of-memory error can name it."""

    def __init__(self, model: Any):
        self.current = "the embedding or first layer"
        self.handles = []
        layers = getattr(getattr(model, "model", model), "layers", None) or []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(f"model.layers.{i}")))

    def _hook(self, name: str):
        def hook(module, args):
            self.current = name
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def oom_names_layer(tracker: LayerTracker, config: Mapping[str, Any], samples: int, seq_len: int) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into one line naming the layer and what to lower."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        layer = tracker.current
        raise UserFacing(f"out of GPU memory in {layer} during {config['method']} calibration with {samples} "
                         f"samples x {seq_len} tokens; lower calibration.num_samples or calibration.seq_len "
                         f"(or use a GPU with more memory)") from None


class Phases:
    """Seconds the child spends in each phase (``mark`` closes the current one), reported in the step's result:
    where a quantization's time went, next to a bare script's (bench/gpu_quantizers.py)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def reset(self) -> None:
        self.seconds.clear()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 2)
        self._last = now


PHASES = Phases()  # one quantization per child process


class UserFacing(Exception):
    """An error the parent shows as is (one line)."""


def probe_ids(ids: list[list[int]]) -> list[int]:
    """Fixed token ids the quantized model is probed with: the first calibration window's start, else a range."""
    return list(ids[0][:PROBE_TOKENS]) if ids else list(range(3, 3 + PROBE_TOKENS))


def write_probe(model: Any, out: Path, ids: list[list[int]]) -> None:
    """Record the quantized model's logits on the probe ids (last positions), as it is right after quantization:
    a loader elsewhere must reproduce them (tests/test_calibrated.py)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    probe = probe_ids(ids)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([probe], device=device)).logits[0, -PROBE_POSITIONS:]
    save_file({"input_ids": np.asarray(probe, dtype=np.int32), "logits": logits.float().cpu().numpy()},
              str(out / C.PROBE_FILE))


def calibration_ids(calibration: Path | None) -> list[list[int]]:
    if calibration is None:
        return []
    from safetensors.numpy import load_file

    return load_file(str(calibration / C.CALIBRATION_TOKENS_FILE))["input_ids"].tolist()


def main(argv: list[str]) -> int:
    import importlib

    preloaded = None
    if argv[0] == "--wait":  # started ahead (``prestarted``): import now, then wait for the request
        t0 = time.perf_counter()
        getattr(importlib.import_module(argv[1]), "preload", lambda: None)()
        preloaded = round(time.perf_counter() - t0, 2)
        argv = [sys.stdin.readline().strip()]
        if not argv[0]:
            return 0  # not needed after all
        PHASES.reset()
    request = json.loads(Path(argv[0]).read_text())
    work = Path(request["work"])
    os.chdir(work)  # libraries' log files stay in work
    PHASES.seconds["start"] = round(time.time() - request.get("requested_at", time.time()), 2)  # interpreter start
    PHASES.mark("imports")  # this module's
    if preloaded is not None:
        PHASES.seconds["imported_ahead"] = preloaded  # before the step: overlapped with the run's earlier work
    try:
        if os.environ.get(ENV_CUDA_MEMORY_FRACTION):
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(float(os.environ[ENV_CUDA_MEMORY_FRACTION]))
        backend = importlib.import_module(request["module"])
        result = backend.run(request, Path(request["model"]), calibration_ids(
            Path(request["calibration"]) if request["calibration"] else None), Path(request["out"]))
    except UserFacing as e:
        (work / ERROR_FILE).write_text(json.dumps({"error": str(e)}))
        return 3
    except Exception as e:  # noqa: BLE001 - the parent reports the first line; the traceback is in the log
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        (work / ERROR_FILE).write_text(json.dumps({"error": f"{type(e).__name__}: {first}"}))
        return 1
    PHASES.mark("finish")
    (work / RESULT_FILE).write_text(json.dumps({**result, "phases_s": PHASES.seconds}))
    return 0


if __name__ == "__main__":  # run as the importable module, so the backends mark this module's PHASES
    from quantmill.backends.quantizer_process import main as module_main

    code = module_main(sys.argv[1:])
    # Everything is written and closed: skip the interpreter's teardown of torch and CUDA (about a second).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
