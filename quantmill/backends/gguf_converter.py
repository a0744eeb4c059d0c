"""HF safetensors -> F16 GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (never a hand-written writer)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import CONVERTERS
from quantmill.backends.base import SourceInfo
from quantmill.errors import PreflightError
from quantmill.toolchain.llamacpp import locate
from quantmill.toolchain.tools import run_tool
from quantmill.toolchain.versions import package_versions

_WRITING = re.compile(r"Writing:\s+(?P<done>\d+)%")
OUTTYPES = ("f16", "bf16", "f32")


class GgufConverter:
    """Converts a Hugging Face model directory to one GGUF file (the shared intermediate of GGUF recipes)."""

    key = "gguf"
    capability = C.LLAMACPP
    identity = False

    def check(self, info: SourceInfo, model_name: str) -> None:
        archs = locate().text_architectures
        if info.architecture not in archs:
            near = sorted(a for a in archs if a[:4].lower() == info.architecture[:4].lower())[:5]
            hint = f" (similar: {', '.join(near)})" if near else ""
            raise PreflightError(
                f"model {model_name!r} has architecture {info.architecture!r}, which llama.cpp's converter "
                f"({locate().build_info['llama_cpp_python']}) cannot convert{hint}; choose a non-GGUF recipe or "
                f"upgrade llama.cpp")
        root = info.extra.get("root")
        if root:  # sources that have the tokenizer files before download (local folders, the Hub's small files)
            from quantmill.toolchain.gguf_vocab import problems

            found = problems(Path(root), info.config, locate().source)
            if found:
                raise PreflightError(
                    f"model {model_name!r}: llama.cpp's converter ({locate().build_info['llama_cpp_python']}) "
                    f"cannot take its tokenizer: {'; '.join(found)}; choose a non-GGUF recipe (safetensors, MLX, "
                    f"AWQ/GPTQ) or pin a llama.cpp whose converter knows this tokenizer")

    def tools(self) -> dict[str, str]:
        return {"llama.cpp": locate().version,
                **package_versions("numpy", "safetensors", "sentencepiece", "tokenizers", "torch", "transformers")}

    def convert(self, model_dir: Path, out_dir: Path, config: Mapping[str, Any]) -> dict[str, Any]:
        outtype, model_name = config["outtype"], config["model_name"]
        if outtype not in OUTTYPES:
            raise PreflightError(f"converter outtype {outtype!r} unknown; choose one of {', '.join(OUTTYPES)}")
        build = locate()
        out = out_dir / (C.GGUF_F16_FILE if outtype == "f16" else f"model-{outtype}.gguf")
        run_tool([sys.executable, build.converter, model_dir, "--outfile", out, "--outtype", outtype,
                  "--model-name", model_name],
                 name="convert_hf_to_gguf.py", label=f"convert {model_name} -> {outtype.upper()} GGUF",
                 env=build.converter_env(), progress=_WRITING, total=100)
        return {"file": out.name, "outtype": outtype}


CONVERTERS.register(GgufConverter.key)(GgufConverter())
