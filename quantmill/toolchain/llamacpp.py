"""The project's pinned llama.cpp build: converter script, tools, and the shared library for the bindings.

One tree (the llama.cpp vendored by a pinned llama-cpp-python sdist, built by scripts/build-llama-cpp.sh) provides
``convert_hf_to_gguf.py``, ``llama-quantize``, ``llama-imatrix``, ``llama-perplexity`` and ``libllama``, so
converter, quantizer and runtime are always the same version, and that version goes into every cache key.
"""

from __future__ import annotations

import ast
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from quantmill import constants as C
from quantmill.errors import PreflightError

BUILD_INFO = "BUILD_INFO.json"


@dataclass(frozen=True)
class LlamaCpp:
    root: Path

    @property
    def source(self) -> Path:
        return self.root / "src" / "vendor" / "llama.cpp"

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.source / "gguf-py"

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise PreflightError(f"llama.cpp tool {name} not found in {self.bin_dir}; rebuild with `make llama-cpp`")
        return path

    @functools.cached_property
    def build_info(self) -> dict[str, str]:
        return json.loads((self.root / BUILD_INFO).read_text())

    @property
    def version(self) -> str:
        """The pin recorded in cache keys and provenance: bindings version + sdist digest + build flags."""
        info = self.build_info
        return f"llama-cpp-python {info['llama_cpp_python']} sdist:sha256:{info['sdist_sha256']} ({info['cmake_flags']})"

    @property
    def cuda(self) -> bool:
        """Built with the CUDA backend (scripts/llama-cpp-flags.sh with LLAMA_CPP_CUDA_ARCHS): imatrix and
        validation then put every layer on the GPU."""
        return "GGML_CUDA=ON" in self.build_info["cmake_flags"]

    def offload_args(self) -> list[str]:
        """The tools' flag that offloads every layer, on a CUDA build (nothing otherwise)."""
        return ["-ngl", "999"] if self.cuda else []

    def converter_env(self) -> dict[str, str]:
        """Environment for running the converter with the gguf-py it was written against."""
        path = os.pathsep.join(p for p in (str(self.gguf_py), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "NO_LOCAL_GGUF": ""}

    @functools.cached_property
    def text_architectures(self) -> frozenset[str]:
        """HF architectures the converter maps to a text model, read from its source (no import, no torch)."""
        init = self.source / "conversion" / "__init__.py"
        tree = ast.parse(init.read_text())
        for node in ast.walk(tree):
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                return frozenset(ast.literal_eval(node.value))
        raise PreflightError(f"cannot read the converter's architecture table from {init}; "
                             f"the llama.cpp build does not match this quantmill version")


def _candidates() -> list[Path]:
    env = os.environ.get(C.ENV_LLAMA_CPP)
    here = Path(__file__).resolve().parents[2]  # the checkout holding the quantmill package
    return [Path(p) for p in (env, Path.cwd() / ".llama.cpp", here / ".llama.cpp") if p]


@functools.cache
def locate() -> LlamaCpp:
    """The llama.cpp build: $QUANTMILL_LLAMA_CPP, ./.llama.cpp, or the one beside the quantmill package."""
    for root in _candidates():
        if (root / BUILD_INFO).is_file():
            return LlamaCpp(root.resolve())
    looked = ", ".join(str(p) for p in _candidates())
    raise PreflightError(f"llama.cpp build not found (looked in {looked}); run `make llama-cpp` or set "
                         f"{C.ENV_LLAMA_CPP} to a build made by scripts/build-llama-cpp.sh")


def import_llama_cpp():
    """Import the llama_cpp bindings against this build's libllama (never a different copy)."""
    build = locate()
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(build.bin_dir))
    import llama_cpp

    return llama_cpp
