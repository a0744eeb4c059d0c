"""ONNX models for ONNX Runtime, made by ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``).

The builder reads a Hugging Face checkpoint and writes ``model.onnx`` + ``model.onnx.data`` (weights), its own
``genai_config.json`` and tokenizer files. The converter makes the unquantized FP32 model for the CPU, the format's
intermediate that every ONNX recipe is measured against; the quantizer makes each recipe's model from the same
checkpoint: int4 (block-wise MatMulNBits, round-to-nearest or k-quant), fp16 or fp32, for the CPU, CUDA or DirectML
execution provider.

Recipe settings (``conf/recipe/onnx_*.yaml``): ``quant_type`` INT4 / INT8 / FP16 / BF16 / FP32 is the builder's
precision; ``params``: ``execution_provider`` (cpu, cuda, dml), and for INT4 / INT8 ``block_size`` (16 to 256),
``accuracy_level`` (0-4, the precision its kernels compute the activations in; 4 is int8, the CPU's fastest) and
``algorithm`` (default, rtn, k_quant), or for INT4 ``source``: a calibrated checkpoint to start from instead of the
unquantized one (``{method: gptq|awq, quant_type: W4A16, params: {...}}``), made by GPTQModel in the run as a step
of its own (keyed like any other) and read by the builder, which keeps its 4-bit weights and scales as they are.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import CONVERTERS, QUANTIZERS
from quantmill.backends.base import QuantizerDefaults, SourceInfo
from quantmill.config import RecipeConfig
from quantmill.errors import PreflightError
from quantmill.toolchain.tools import run_tool
from quantmill.toolchain.versions import package_versions

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
WEIGHT_ONLY = ("int4", "int8")  # MatMulNBits: block size, accuracy level and algorithm apply
PROVIDERS = ("cpu", "cuda", "dml")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("default", "rtn", "k_quant")
PARAMS = ("execution_provider", "block_size", "accuracy_level", "algorithm", "source")
SOURCE_METHODS = ("gptq", "awq")  # the checkpoint formats of GPTQModel the builder reads (quant_method)
SOURCE_KEYS = ("method", "quant_type", "params")
MODEL_FILES = ("model.onnx", "model.onnx.data")


def require_onnx(what: str) -> None:
    for package, pip_name in (("onnxruntime_genai", "onnxruntime-genai"), ("onnxruntime", "onnxruntime"),
                              ("onnx", "onnx")):
        if importlib.util.find_spec(package) is None:
            raise PreflightError(f"{what} needs {pip_name}; pip install 'quantmill[onnx]' (or run on a pool with "
                                 f"capability onnx)")


@functools.lru_cache(maxsize=1)
def builder_architectures() -> frozenset[str]:
    """The architectures the installed builder dispatches on, read from its source (``config.architectures[0] ==
    "LlamaForCausalLM"``): a model it does not know fails in preflight, not minutes into the build."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or not spec.origin:
        return frozenset()
    return frozenset(re.findall(r'architectures\[0\] == "(\w+)"', Path(spec.origin).read_text()))


def check_architecture(info: SourceInfo, model_name: str) -> None:
    known = builder_architectures()
    if info.architecture not in known:
        raise PreflightError(f"model {model_name!r} is a {info.architecture}, which ONNX Runtime GenAI's model "
                             f"builder {package_versions('onnxruntime-genai')['onnxruntime-genai']} does not build "
                             f"({len(known)} architectures it does); choose a GGUF or safetensors recipe")


def build(model: Path, out: Path, *, precision: str, provider: str, extra: Mapping[str, Any], label: str) -> float:
    """Run the builder into ``out``; its seconds. The model's files land in ``out`` directly."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-cache-") as cache:
        model = _checkpoint_only(model, Path(cache))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model), "-i", str(model),
               "-o", str(out), "-p", precision, "-e", provider, "-c", cache]
        if extra:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
        # The builder loads the checkpoint with transformers; no hub access is needed or wanted.
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        done = run_tool(cmd, name="onnxruntime-genai model builder", label=label, env=env)
    for name in MODEL_FILES[:1]:
        if not (out / name).is_file():
            raise PreflightError(f"the ONNX model builder wrote no {name} into {out}; its log: {done.tail[-500:]}")
    return done.seconds


def _checkpoint_only(model: Path, cache: Path) -> Path:
    """The checkpoint without quantmill's own files beside it: the builder reads every ``*.safetensors`` of its input
    folder as weights, so a quantized artifact's probe file would be taken for a layer. Hard links, no copies."""
    extra = [f for f in model.iterdir() if f.name.startswith("quantmill")]
    if not extra:
        return model
    staged = cache / "checkpoint"
    staged.mkdir()
    for f in model.iterdir():
        if f.is_file() and not f.name.startswith("quantmill"):
            try:
                (staged / f.name).hardlink_to(f)
            except OSError:  # another filesystem
                (staged / f.name).symlink_to(f.resolve())
    return staged


def logical_bits(artifact: Path) -> float:
    """Stored bits per model parameter: a MatMulNBits weight counts its K x N parameters, other initialisers their
    elements; the bytes are the model's files."""
    import onnx

    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    params = 0
    packed = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            params += attrs["K"] * attrs["N"]
            packed.update(node.input[1:4])  # the packed weight, its scales and zero points
    for init in model.graph.initializer:
        if init.name not in packed:
            n = 1
            for d in init.dims:
                n *= d
            params += n
    size = sum((artifact / f).stat().st_size for f in MODEL_FILES if (artifact / f).is_file())
    return 8 * size / params if params else 0.0


class OnnxConverter:
    """The format's intermediate: the FP32 CPU model every ONNX recipe is measured against."""

    key = "onnx"
    capability = C.ONNX
    identity = False

    def check(self, info: SourceInfo, model_name: str) -> None:
        require_onnx("format 'onnx'")
        check_architecture(info, model_name)

    def tools(self) -> dict[str, str]:
        return package_versions("onnxruntime-genai", "onnxruntime", "onnx", "transformers")

    def convert(self, model: Path, out: Path, config: Mapping[str, Any]) -> dict[str, Any]:
        precision = config["dtype"]
        if precision not in PRECISIONS:
            raise PreflightError(f"convert.onnx_precision {precision!r} unknown; choose {', '.join(PRECISIONS)}")
        build(model, out, precision=precision, provider="cpu", extra={}, label="convert onnx")
        return {"outtype": precision, "execution_provider": "cpu"}


def _options(params: Mapping[str, Any]) -> dict[str, Any]:
    names = {"block_size": "block_size", "accuracy_level": "accuracy_level", "algorithm": "algo_config"}
    return {names[k]: v for k, v in params.items() if k in names}


class OnnxQuantizer(QuantizerDefaults):
    key = "onnx"
    capability = C.ONNX
    formats = ("onnx",)

    def check(self, name: str, recipe: RecipeConfig) -> None:
        precision = (recipe.quant_type or "").lower()
        if precision not in PRECISIONS:
            raise PreflightError(f"recipe {name!r}: quant_type {recipe.quant_type!r} unknown to the ONNX model "
                                 f"builder; known: {', '.join(p.upper() for p in PRECISIONS)}")
        params = recipe.params
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise PreflightError(f"recipe {name!r}: unknown params {unknown}; known: {', '.join(PARAMS)}")
        provider = params.get("execution_provider", "cpu")
        if provider not in PROVIDERS:
            raise PreflightError(f"recipe {name!r}: execution_provider {provider!r} unknown; choose "
                                 f"{', '.join(PROVIDERS)}")
        if "source" in params:
            check_source(name, recipe)
        if precision not in WEIGHT_ONLY and set(params) & {"block_size", "accuracy_level", "algorithm"}:
            raise PreflightError(f"recipe {name!r}: block_size, accuracy_level and algorithm apply to INT4 and INT8 "
                                 f"only; drop them or set quant_type: INT4")
        if params.get("block_size", 32) not in BLOCK_SIZES:
            raise PreflightError(f"recipe {name!r}: block_size {params['block_size']} unsupported; choose one of "
                                 f"{', '.join(map(str, BLOCK_SIZES))}")
        if params.get("accuracy_level", 0) not in range(5):
            raise PreflightError(f"recipe {name!r}: accuracy_level {params['accuracy_level']} out of range; choose "
                                 f"0 to 4 (4: int8 activations, the CPU's fastest)")
        if params.get("algorithm", "default") not in ALGORITHMS:
            raise PreflightError(f"recipe {name!r}: algorithm {params['algorithm']!r} unknown; choose "
                                 f"{', '.join(ALGORITHMS)}")

    def check_model(self, name: str, recipe: RecipeConfig, info: SourceInfo) -> None:
        require_onnx(f"recipe {name!r}")
        check_architecture(info, name)
        source = self.source_recipe(recipe)
        if source is not None:
            QUANTIZERS.get(source.backend).check_model(f"{name}.source", source, info)
        block = recipe.params.get("block_size", 32)
        if source is None and recipe.quant_type.lower() in WEIGHT_ONLY:
            for key in ("hidden_size", "intermediate_size"):
                width = info.config.get(key)
                if width and width % block:
                    raise PreflightError(f"recipe {name!r}: block_size {block} does not divide the model's {key} "
                                         f"{width}; choose a block size that does (16 divides most)")

    def source_recipe(self, recipe: RecipeConfig) -> RecipeConfig | None:
        return source_recipe(recipe)

    def needs_calibration(self, recipe: RecipeConfig) -> bool:
        return self.source_recipe(recipe) is not None

    def estimate_bytes(self, recipe: RecipeConfig, f16_bytes: int) -> int:
        bits = {"int4": 4.5, "int8": 8.5, "fp16": 16, "bf16": 16, "fp32": 32}[recipe.quant_type.lower()]
        return int(f16_bytes * bits / 16)

    def tools(self) -> dict[str, str]:
        return package_versions("onnxruntime-genai", "onnxruntime", "onnx", "transformers")

    def quantize(self, model: Path, out: Path, config: Mapping[str, Any], *, imatrix: Path | None, threads: int,
                 label: str, source: Path | None = None) -> dict[str, Any]:
        precision = config["quant_type"].lower()
        params = dict(config["params"])
        provider = params.get("execution_provider", "cpu")
        if params.get("source") and source is None:
            raise PreflightError(f"{label}: params.source names a calibrated checkpoint but the step got none")
        build(source or model, out, precision=precision, provider=provider, extra=_options(params), label=label)
        genai = json.loads((out / "genai_config.json").read_text())
        made_from = {}
        if source is not None:
            made_from = {"source": {k: params["source"][k] for k in ("method", "quant_type") if k in params["source"]}}
        return {"quant_type": config["quant_type"], "execution_provider": provider, **made_from,
                **({k: params[k] for k in ("block_size", "accuracy_level", "algorithm") if k in params}),
                "genai_model_type": genai.get("model", {}).get("type"),
                "bits_per_weight": round(logical_bits(out), 4)}


def source_recipe(recipe: RecipeConfig) -> RecipeConfig | None:
    """The calibrated checkpoint the recipe starts from (``params.source``), as a recipe of GPTQModel's, or None."""
    source = recipe.params.get("source")
    if not source:
        return None
    return RecipeConfig(method=source["method"], backend="gptqmodel", format=source["method"],
                        quant_type=str(source["quant_type"]).upper(), params=dict(source.get("params") or {}))


def check_source(name: str, recipe: RecipeConfig) -> None:
    """``params.source``: a GPTQ or AWQ W4A16 recipe GPTQModel can make, for an INT4 model."""
    source = recipe.params["source"]
    if not isinstance(source, Mapping) or set(source) - set(SOURCE_KEYS) or "method" not in source:
        raise PreflightError(f"recipe {name!r}: params.source must be a mapping of {', '.join(SOURCE_KEYS)}, e.g. "
                             f"{{method: gptq, quant_type: W4A16, params: {{group_size: 128}}}}")
    if source["method"] not in SOURCE_METHODS:
        raise PreflightError(f"recipe {name!r}: params.source.method {source['method']!r} is not a checkpoint the "
                             f"ONNX model builder reads; choose {' or '.join(SOURCE_METHODS)}")
    if (recipe.quant_type or "").upper() != "INT4" or str(source.get("quant_type", "")).upper() != "W4A16":
        raise PreflightError(f"recipe {name!r}: a calibrated source keeps its 4-bit weights, so quant_type must be "
                             f"INT4 and params.source.quant_type W4A16 (got {recipe.quant_type}, "
                             f"{source.get('quant_type')})")
    if set(recipe.params) & {"block_size", "algorithm"}:
        raise PreflightError(f"recipe {name!r}: block_size and algorithm come from the calibrated source; set "
                             f"params.source.params.group_size instead")
    QUANTIZERS.get("gptqmodel").check(f"{name}.source", source_recipe(recipe))


CONVERTERS.register(OnnxConverter.key)(OnnxConverter())
QUANTIZERS.register(OnnxQuantizer.key)(OnnxQuantizer())
