"""GGUF quantization with llama.cpp's ``llama-quantize``, and importance matrices with ``llama-imatrix``."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import QUANTIZERS
from quantmill.backends.base import QuantizerDefaults
from quantmill.config import RecipeConfig
from quantmill.errors import PreflightError
from quantmill.toolchain.gguf_info import bits_per_weight, fallback, weight_types
from quantmill.toolchain.llamacpp import locate
from quantmill.toolchain.tools import run_tool

_TENSOR = re.compile(r"\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")
_CHUNK = re.compile(r"\[(?P<done>\d+)\]")

# Approximate bits per weight, for disk estimates before anything runs.
APPROX_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
              "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_L": 4.3,
              "Q3_K_M": 3.9, "Q3_K_S": 3.5, "Q2_K": 3.0, "Q2_K_S": 2.9}


@functools.cache
def known_quant_types() -> tuple[str, ...]:
    """The type names this llama.cpp build's quantizer accepts, read from its source."""
    source = locate().source / "tools" / "quantize" / "quantize.cpp"
    types = re.findall(r'\{\s*"(\w+)",\s*LLAMA_FTYPE_', source.read_text())
    return tuple(sorted(set(types)))


class GgufQuantizer(QuantizerDefaults):
    """F16 GGUF -> quantized GGUF, optionally with an importance matrix."""

    key = "gguf"
    capability = C.LLAMACPP
    formats = ("gguf",)
    reads = "intermediate"
    calibration_input = "imatrix"

    def check(self, name: str, recipe: RecipeConfig) -> None:
        types = known_quant_types()
        if not recipe.quant_type or recipe.quant_type.upper() not in types:
            raise PreflightError(f"recipe {name!r}: quant_type {recipe.quant_type!r} is not a llama.cpp type; "
                                 f"known: {', '.join(types)}")
        if recipe.params:
            raise PreflightError(f"recipe {name!r}: method 'gguf' takes no params (got {sorted(recipe.params)})")

    def is_intermediate(self, recipe: RecipeConfig, outtype: str = "f16") -> bool:
        """A recipe whose type is the converter's output type is that output itself: nothing to quantize."""
        return (recipe.quant_type or "").upper() == outtype.upper()

    def needs_calibration(self, recipe: RecipeConfig) -> bool:
        return recipe.imatrix

    def estimate_bytes(self, recipe: RecipeConfig, f16_bytes: int) -> int:
        return int(f16_bytes * APPROX_BPW.get((recipe.quant_type or "").upper(), 16) / 16)

    def tools(self) -> dict[str, str]:
        return {"llama.cpp": locate().version}

    def quantize(self, model_dir: Path, out_dir: Path, config: Mapping[str, Any], *, imatrix: Path | None,
                 threads: int, label: str) -> dict[str, Any]:
        quant_type = config["quant_type"]
        model = one_gguf(model_dir)
        if imatrix is not None:
            imatrix = one_gguf(imatrix)
        out = (out_dir / f"model-{quant_type.lower()}.gguf").resolve()
        cmd: list[Any] = [locate().tool("llama-quantize")]
        cwd = None
        if imatrix is not None:  # relative: llama-quantize records the imatrix file name in the output
            cmd += ["--imatrix", imatrix.name]
            cwd = imatrix.parent
        cmd += [model.resolve(), out, quant_type.upper()]
        if threads:
            cmd.append(threads)
        run_tool(cmd, name="llama-quantize", label=label, progress=_TENSOR, cwd=cwd)
        result = {"file": out.name, "quant_type": quant_type.upper(), "imatrix": imatrix is not None,
                  "bits_per_weight": round(bits_per_weight(out), 4)}
        # Rows a k-quant's blocks do not divide are stored in another type, silently: the label says what the
        # file holds, and the recipe's type stays beside it.
        return {**result, **(fallback(quant_type, weight_types(out)) or {})}


def one_gguf(directory: Path) -> Path:
    files = sorted(directory.glob("*.gguf"))
    if len(files) != 1:
        raise PreflightError(f"artifact {directory.parent.name} should hold one .gguf file, found {len(files)}")
    return files[0]


def compute_imatrix(model: Path, text: Path, out: Path, *, ctx: int, chunks: int, threads: int,
                    label: str) -> dict[str, Any]:
    """Run ``llama-imatrix`` over the calibration text (``chunks`` windows of ``ctx`` tokens)."""
    # The text by relative name: llama-imatrix records the dataset name in the output.
    cmd: list[Any] = [locate().tool("llama-imatrix"), "-m", model.resolve(), "-f", text.name, "-o", out.resolve(),
                      "-c", ctx, "--chunks", chunks, "--no-ppl", "-b", ctx, "--seed", 0, *locate().offload_args()]
    if threads:
        cmd += ["-t", threads]
    run_tool(cmd, name="llama-imatrix", label=label, progress=_CHUNK, total=chunks, cwd=text.parent)
    if not out.is_file():
        raise PreflightError(f"llama-imatrix wrote no {out.name}; the calibration text may be shorter than "
                             f"one window of {ctx} tokens: lower calibration.seq_len or add text")
    return {"file": out.name, "ctx": ctx, "chunks": chunks}


QUANTIZERS.register(GgufQuantizer.key)(GgufQuantizer())
