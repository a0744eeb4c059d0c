"""What the torch quantizers (llm-compressor, GPTQModel, bitsandbytes, the legacy AutoAWQ/AutoGPTQ) share.

Each recipe names a ``method`` (gptq, awq, fp8, nvfp4, smoothquant, bnb) and a ``quant_type`` (the scheme, e.g.
``W4A16``); the backend checks both, and the model's shape, in preflight. Quantization runs in a child process
(``python -m quantmill.backends.quantizer_process REQUEST.json``): its GPU memory is returned when it ends, its peak is its
own, two recipes never share a library's global state, and an out-of-memory error names the layer it hit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from quantmill import constants as C
from quantmill.backends.base import QuantizerDefaults, SourceInfo, check_shard_size, check_transformers_loads
from quantmill.backends.quantizer_process import ERROR_FILE, REQUEST_FILE, RESULT_FILE
from quantmill.config import RecipeConfig
from quantmill.errors import PreflightError, ToolError

# Files of the source checkpoint that every output keeps byte for byte (quantizers re-save some of them
# differently; the tokenizer-fidelity gate wants the source's).
CARRIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json")


class CalibratedQuantizer(QuantizerDefaults):
    """Base of the torch quantizer backends.

    Subclasses set ``key``, ``formats``, ``schemes`` (method -> the quant types it takes), ``params`` (the
    recipe params it takes), ``calibrated`` (methods that read the calibration set) and ``module`` (where the
    child process finds ``run(request, model, calibration, out)``).
    """

    capability = C.CPU
    schemes: Mapping[str, tuple[str, ...]] = {}
    params: tuple[str, ...] = ()
    calibrated: tuple[str, ...] = ()
    module = ""
    packages: tuple[str, ...] = ()

    def check(self, name: str, recipe: RecipeConfig) -> None:
        if recipe.method not in self.schemes:
            raise PreflightError(f"recipe {name!r}: method {recipe.method!r} unknown to backend {self.key!r}; "
                                 f"it runs: {', '.join(self.schemes)}")
        valid = self.schemes[recipe.method]
        if (recipe.quant_type or "").upper() not in valid:
            raise PreflightError(f"recipe {name!r}: scheme {recipe.quant_type!r} unknown to {self.key} "
                                 f"{recipe.method}; valid: {', '.join(valid)}")
        unknown = sorted(set(recipe.params) - set(self.params))
        if unknown:
            raise PreflightError(f"recipe {name!r}: unknown params {unknown} for backend {self.key!r}; known: "
                                 f"{', '.join(self.params)}")
        check_shard_size(name, recipe.params)
        group = recipe.params.get("group_size")
        if group is not None and (not isinstance(group, int) or group < -1 or group == 0):
            raise PreflightError(f"recipe {name!r}: group_size {group!r} must be a positive integer (or -1: per "
                                 f"channel)")

    def check_model(self, name: str, recipe: RecipeConfig, info: SourceInfo) -> None:
        """transformers must load the model, and the group size must divide every quantized layer's input width."""
        check_transformers_loads(name, info)
        group = recipe.params.get("group_size")
        if not group or group < 0:
            return
        widths = {"hidden_size": info.config.get("hidden_size"),
                  "intermediate_size": info.config.get("intermediate_size")}
        for what, width in widths.items():
            if width and width % group:
                raise PreflightError(f"recipe {name!r}: group_size {group} does not divide model "
                                     f"{info.base_model!r}'s {what} {width}; choose a group size that divides "
                                     f"it (e.g. {_divisor(width, group)}) or -1 for per-channel")

    def needs_calibration(self, recipe: RecipeConfig) -> bool:
        return recipe.method in self.calibrated

    def estimate_bytes(self, recipe: RecipeConfig, f16_bytes: int) -> int:
        return int(f16_bytes * (scheme_bits(recipe.quant_type or "") + 0.5) / 16)

    def tools(self) -> dict[str, str]:
        from quantmill.toolchain.versions import package_versions

        return package_versions(*self.packages)

    def python(self) -> str:
        """The interpreter the child runs in (legacy backends use an environment of their own)."""
        return sys.executable

    def child_command(self, request_file: Path) -> list[str]:
        return [self.python(), "-m", "quantmill.backends.quantizer_process", str(request_file)]

    def waiting_command(self) -> list[str] | None:
        """A child that imports its libraries now and reads its request file's path from stdin later (see
        ``prestarted``); None where the child is another program (the legacy backends' scripts)."""
        return [self.python(), "-m", "quantmill.backends.quantizer_process", "--wait", self.module]

    def quantize(self, model: Path, out: Path, config: Mapping[str, Any], *, imatrix: Path | None, threads: int,
                 label: str, calibration: Path | None = None) -> dict[str, Any]:
        from quantmill.toolchain.tools import follow_tool, run_tool

        with tempfile.TemporaryDirectory(prefix="quantmill-quantize-") as tmp:
            work = Path(tmp)
            request = {"module": self.module, "config": dict(config), "model": str(model), "out": str(out),
                       "calibration": str(calibration) if calibration else None, "threads": threads,
                       "work": str(work), "requested_at": time.time()}
            (work / REQUEST_FILE).write_text(json.dumps(request))
            name = f"{self.key} {config['method']}"
            try:
                waiting = WAITING.take(self)
                if waiting is not None:  # already imported: hand it the request
                    try:
                        waiting.stdin.write(f"{work / REQUEST_FILE}\n".encode())
                        waiting.stdin.close()
                    except BrokenPipeError:
                        pass  # it died importing: follow_tool reports its exit code and last lines
                    ran = follow_tool(waiting, name=name, label=label, tail_lines=40)
                else:  # libraries' log files stay in work
                    ran = run_tool(self.child_command(work / REQUEST_FILE), name=name, label=label,
                                   env=_child_env(), cwd=work, tail_lines=40)
            except ToolError as e:
                error = work / ERROR_FILE
                if error.is_file():
                    raise ToolError(f"{label}: {json.loads(error.read_text())['error']}") from None
                raise ToolError(f"{label}: {e}") from None
            finally:
                WAITING.replace(self)
            result = json.loads((work / RESULT_FILE).read_text())
        t0 = time.perf_counter()
        carry_files(model, out)
        result.update({"method": config["method"], "scheme": config["quant_type"], "backend": self.key,
                       "bits_per_weight": round(bits_per_source_weight(model, out), 4),
                       "peak_rss_bytes": ran.max_rss_bytes})
        result["phases_s"] = {**result.get("phases_s", {}), "child_process": round(ran.seconds, 2),
                              "after_child": round(time.perf_counter() - t0, 2)}
        return result


def _child_env() -> dict[str, str]:
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class WaitingChildren:
    """Children started ahead of their quantize steps, one per backend at a time, with how many more of that
    backend's quantizations the run expects (a taken child is replaced while more are to come)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.children: dict[str, subprocess.Popen] = {}
        self.expected: dict[str, int] = {}
        self.kept = False  # a long-lived process (``keep_quantizers``): each backend's next child starts at once

    def replace(self, quantizer: CalibratedQuantizer) -> None:
        """After one of ``quantizer``'s children has ended: in a long-lived process, start the next now, so that
        it has imported its libraries when the next quantization comes."""
        if self.kept:
            with self.lock:
                self.start(quantizer)

    def start(self, quantizer: CalibratedQuantizer) -> None:
        """Start ``quantizer``'s waiting child unless one waits already (called with the lock held)."""
        from quantmill.toolchain.tools import start_tool

        command = quantizer.waiting_command()
        if command is None or quantizer.key in self.children:
            return
        self.children[quantizer.key] = start_tool(command, name=quantizer.key, env=_child_env(),
                                                  cwd=Path(tempfile.gettempdir()), stdin=subprocess.PIPE)

    def take(self, quantizer: CalibratedQuantizer) -> subprocess.Popen | None:
        with self.lock:
            child = self.children.pop(quantizer.key, None)
            left = self.expected.get(quantizer.key, 0) - 1
            self.expected[quantizer.key] = max(0, left)
            if left > 0:
                self.start(quantizer)
        return child if child is not None and child.poll() is None else None

    def expect(self, quantizers: Iterable[Any]) -> None:
        """Keep one waiting child per backend the run's quantize steps use (counting them, so that a taken child
        is replaced while more are to come); stop the others."""
        counts: dict[str, int] = {}
        for q in quantizers:
            if isinstance(q, CalibratedQuantizer) and q.waiting_command() is not None:
                counts[q.key] = counts.get(q.key, 0) + 1
        with self.lock:
            unneeded = [self.children.pop(key) for key in list(self.children) if key not in counts]
            self.expected = counts
        _stop(unneeded)

    def stop_all(self) -> None:
        with self.lock:
            children, self.children, self.expected = list(self.children.values()), {}, {}
        _stop(children)


def _stop(children: Iterable[subprocess.Popen]) -> None:
    for child in children:
        child.kill()
        child.wait()


WAITING = WaitingChildren()


@contextmanager
def prestarted(quantizers: Iterable[Any]) -> Iterator[WaitingChildren]:
    """Start the child processes of the torch quantizations a run may do, so that importing torch and the
    quantization library (as long as an FP8 quantization itself) overlaps the run's
    planning and earlier steps instead of following them; the run then says which it needs (``expect``).
    Children still waiting at the end are stopped."""
    with WAITING.lock:
        for q in quantizers:
            if isinstance(q, CalibratedQuantizer):
                WAITING.start(q)
    try:
        yield WAITING
    finally:
        WAITING.stop_all()


def keep_quantizers() -> None:
    """In a process that outlives its runs (a warm worker), keep one child waiting, imported, per backend that has
    quantized here: its next quantization then starts at once instead of importing torch and its library first
    (longer than an FP8 quantization). Each kept child holds its imports' memory and no GPU memory; ``stop_kept`` ends them, and a child whose parent died ends at its stdin's close."""
    WAITING.kept = True


def stop_kept() -> None:
    WAITING.kept = False
    WAITING.stop_all()


def scheme_bits(scheme: str) -> float:
    """Weight bits of a scheme name: W4A16 -> 4, FP8_DYNAMIC -> 8, NVFP4 -> 4.5 (with its scales), NF4 -> 4.5."""
    import re

    s = scheme.upper()
    if m := re.match(r"W(\d+)A", s):
        return float(m.group(1))
    if "FP4" in s or s == "NF4":
        return 4.5
    return 8.0


def _divisor(width: int, group: int) -> int:
    return next(g for g in (128, 64, 32, 16, 8) if width % g == 0) if width % 8 == 0 else -1


def carry_files(model: Path, out: Path) -> None:
    """Copy the source's tokenizer and generation config over whatever the quantizer wrote."""
    for name in CARRIED_FILES:
        if (model / name).is_file():
            shutil.copyfile(model / name, out / name)
        elif (out / name).is_file() and name == "chat_template.jinja":
            (out / name).unlink()  # a template the source did not have would change the chat format


def bits_per_source_weight(model: Path, out: Path) -> float:
    """Bits the output's safetensors take per parameter of the source model (packing-agnostic)."""
    from quantmill.toolchain.model_files import safetensors_tensors

    params = sum(t[2] for t in safetensors_tensors(model))
    stored = sum(t[3] for t in safetensors_tensors(out))
    return 8 * stored / params if params else 0.0


# -- the child process ---------------------------------------------------------------------------------------
