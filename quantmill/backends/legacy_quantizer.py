"""``autoawq`` and ``autogptq``: the archived libraries the model cards name, each in an environment of its own.

Both pin transformers 4.x, which the main environment (transformers 5) cannot hold; they run as a child process of
another Python (QUANTMILL_LEGACY_PYTHON, else ``.venv-legacy/bin/python`` in the project; made by
``scripts/make-legacy-env.sh``), whose package versions go into the provenance. Their maintainers point to
llm-compressor and GPTQModel, the backends to use for new work.
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path

from quantmill.backends import QUANTIZERS
from quantmill.backends.calibrated import CalibratedQuantizer
from quantmill.errors import PreflightError

ENV_LEGACY_PYTHON = "QUANTMILL_LEGACY_PYTHON"
SCRIPTS = Path(__file__).resolve().parent.parent / "legacy"


def legacy_python() -> Path:
    explicit = os.environ.get(ENV_LEGACY_PYTHON)
    return Path(explicit) if explicit else Path.cwd() / ".venv-legacy" / "bin" / "python"


@lru_cache(maxsize=4)
def _versions(python: str, packages: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else {}


class LegacyQuantizer(CalibratedQuantizer):
    library = ""
    script = ""
    needs_cuda_reason = ""

    def python(self) -> str:
        return str(legacy_python())

    def check(self, name: str, recipe) -> None:
        super().check(name, recipe)
        python = legacy_python()
        if not python.is_file():
            raise PreflightError(f"recipe {name!r}: backend {self.key!r} runs in an environment of its own, and "
                                 f"{python} does not exist; create it with `scripts/make-legacy-env.sh {self.key}` "
                                 f"or set {ENV_LEGACY_PYTHON}")
        if self.library not in _versions(str(python), (self.library,)):
            raise PreflightError(f"recipe {name!r}: {python} has no {self.library}; create the environment with "
                                 f"`scripts/make-legacy-env.sh {self.key}`")
        if self.needs_cuda_reason:
            from quantmill.toolchain.hardware import cuda_gpus

            if not cuda_gpus():
                raise PreflightError(f"recipe {name!r}: backend {self.key!r} cannot run here: {self.needs_cuda_reason}; "
                                     f"use backend=gptqmodel or backend=llmcompressor for the same recipe")

    def tools(self) -> dict[str, str]:
        versions = _versions(self.python(), (self.library, "torch", "transformers"))
        return {f"legacy-env:{k}": v for k, v in versions.items()}

    def child_command(self, request_file: Path) -> list[str]:
        return [self.python(), str(SCRIPTS / self.script), str(request_file)]

    def waiting_command(self) -> None:
        return None  # its script is started when the step runs


class AutoAwqQuantizer(LegacyQuantizer):
    key = "autoawq"
    library = "autoawq"
    script = "run_autoawq.py"
    formats = ("awq",)
    schemes = {"awq": ("W4A16", "W4A16_ASYM")}
    params = ("group_size", "sym", "version", "ignore", "max_shard_size")
    calibrated = ("awq",)


class AutoGptqQuantizer(LegacyQuantizer):
    key = "autogptq"
    library = "auto-gptq"
    script = "run_autogptq.py"
    formats = ("gptq",)
    schemes = {"gptq": ("W4A16", "W8A16")}
    params = ("group_size", "desc_act", "sym", "ignore", "max_shard_size")
    calibrated = ("gptq",)
    needs_cuda_reason = "AutoGPTQ 0.7.1 refuses to quantize without a CUDA device"


for _backend in (AutoAwqQuantizer(), AutoGptqQuantizer()):
    QUANTIZERS.register(_backend.key)(_backend)
