"""``llmcompressor``: GPTQ, AWQ, FP8, NVFP4 and SmoothQuant W8A8 with llm-compressor's ``oneshot``.

Writes compressed-tensors safetensors (what vLLM and transformers load) plus the ``recipe.yaml`` it ran.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from quantmill.backends import QUANTIZERS
from quantmill.backends.calibrated import CalibratedQuantizer
from quantmill.backends.quantizer_process import PHASES, LayerTracker, oom_names_layer, write_probe
from quantmill.config import RecipeConfig

DATA_FREE = ("FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16")


class LlmCompressorQuantizer(CalibratedQuantizer):
    key = "llmcompressor"
    formats = ("compressed-tensors",)
    schemes = {
        "gptq": ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "W4A8"),
        "awq": ("W4A16", "W4A16_ASYM"),
        "fp8": ("FP8_DYNAMIC", "FP8", "FP8_BLOCK"),
        "nvfp4": ("NVFP4", "NVFP4A16"),
        "smoothquant": ("W8A8",),
    }
    params = ("group_size", "ignore", "targets", "dampening_frac", "actorder", "smoothing_strength", "max_shard_size")
    calibrated = ("gptq", "awq", "fp8", "nvfp4", "smoothquant")
    module = __name__
    packages = ("llmcompressor", "compressed-tensors", "torch", "transformers")
    renamed_when_complete = ("*.safetensors",)  # transformers saves each shard with safetensors' save_file

    def needs_calibration(self, recipe: RecipeConfig) -> bool:
        return recipe.method in self.calibrated and (recipe.quant_type or "").upper() not in DATA_FREE


QUANTIZERS.register(LlmCompressorQuantizer.key)(LlmCompressorQuantizer())


# -- in the child process ------------------------------------------------------------------------------------
def _scheme(config: dict[str, Any]) -> dict[str, Any]:
    """``scheme=`` for a preset, or ``config_groups=`` when the recipe changes the preset's group size."""
    params = config["params"]
    targets = list(params.get("targets", ["Linear"]))
    group = params.get("group_size")
    if group is None:
        return {"scheme": config["quant_type"], "targets": targets}
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(config["quant_type"], targets)
    scheme.weights.group_size = None if group == -1 else group
    scheme.weights.strategy = "channel" if group == -1 else "group"
    return {"config_groups": {"group_0": scheme}}


def build_recipe(config: dict[str, Any]) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    params = config["params"]
    ignore = list(params.get("ignore", ["lm_head"]))
    method = config["method"]
    if method == "gptq":
        extra = {k: params[k] for k in ("dampening_frac", "actorder") if k in params}
        return [GPTQModifier(ignore=ignore, **_scheme(config), **extra)]
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(ignore=ignore, **_scheme(config))]
    if method == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=params.get("smoothing_strength", 0.8)),
                GPTQModifier(ignore=ignore, **_scheme(config))]
    return [QuantizationModifier(ignore=ignore, **_scheme(config))]  # fp8, nvfp4


@contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """llm-compressor's AWQ pins its cached activations for faster copies to the GPU; without one,
    ``pin_memory`` raises. For this call only, on a machine without CUDA, keep them unpinned."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@contextmanager
def probe_then_compress(model: Any, *, compress: bool = True) -> Iterator[None]:
    """While inside, each quantized module's forward copies its offloaded weights to the GPU once, computes with
    the fake-quantized copy and then (``compress``) compresses the module from that copy, as the compressed save
    would have.

    After ``oneshot`` on a GPU the weights stay offloaded to the CPU, and compressed-tensors copies a parameter to
    the GPU on every access. Its quantized forward reads the weight, fake-quantizes that copy, then runs the
    module's own forward, which reads the weight again: a second copy, of the weight as it is stored. For methods
    that keep the unquantized weight and quantize it in the forward (FP8, NVFP4), a probe taken so computed the
    unquantized model's logits, and weights crossed twice (``bench/probe_onload.py`` counts the copies). Inside ``disable_offloading`` the first copy is kept and reused, and it
    is dropped when the module returns, so at most one module's weights are on the GPU at a time.

    The compressed save then copies every quantized weight to the GPU once more to compress it there
    (``compress_model`` reads each module's parameters through the same offload cache). Compressing the module
    while its probe copy is still on the GPU saves that crossing; the save skips modules already compressed
    (``skip_compressed``) and compresses any the probe did not reach. A module the forward reaches twice (one
    registered under two names) would be compressed before its second call, so such models compress at the save.
    """
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.offload import disable_offloading
    from compressed_tensors.offload.cache.base import OffloadCache

    quantized = [m for _, m in model.named_modules(remove_duplicate=False) if getattr(m, "quantization_scheme", None)]
    compress = compress and len({id(m) for m in quantized}) == len(quantized)
    contexts: dict[int, Any] = {}

    def enter(module, _args):
        if isinstance(module._parameters, OffloadCache):
            contexts[id(module)] = context = disable_offloading()
            context.__enter__()

    def leave(module, _args, _output):
        if compress:
            compress_module(module)
        if id(module) in contexts:
            contexts.pop(id(module)).__exit__(None, None, None)

    modules = list({id(m): m for m in quantized}.values())
    hooks = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for context in contexts.values():  # a forward that raised: leave its context too
            context.__exit__(None, None, None)


def _source_dtype(model_dir: Path):
    import json

    import torch

    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def preload() -> None:
    """What ``run`` imports, imported by a child started ahead of its step."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from llmcompressor import oneshot  # noqa: F401
    from llmcompressor.modifiers.awq import AWQModifier  # noqa: F401
    from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def run(request: dict[str, Any], model_dir: Path, ids: list[list[int]], out: Path) -> dict[str, Any]:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    PHASES.mark("imports")
    config = request["config"]
    torch.manual_seed(0)
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    cuda = torch.cuda.is_available()
    # On CPU the calibration math runs in float32 (half precision is several times slower there); the saved
    # checkpoint keeps the source's dtype either way.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto" if cuda else torch.float32)
    source_dtype = _source_dtype(model_dir)
    PHASES.mark("load")
    kwargs: dict[str, Any] = {}
    if ids:
        from datasets import Dataset

        kwargs = {"dataset": Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
                  "max_seq_length": len(ids[0]), "num_calibration_samples": len(ids)}
    tracker = LayerTracker(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with oom_names_layer(tracker, config, len(ids), len(ids[0]) if ids else 0), _no_pinning_without_accelerator():
        oneshot(model=model, recipe=build_recipe(config), **kwargs)
    tracker.remove()
    PHASES.mark("oneshot")
    if not cuda and source_dtype is not None:
        model.to(source_dtype)  # round to the dtype it is saved in, then probe it in float32 as loaders on CPU do
        model.to(torch.float32)
        write_probe(model, out, ids)
        model.to(source_dtype)
        model.config.dtype = source_dtype
    else:
        with probe_then_compress(model):
            write_probe(model, out, ids)
    PHASES.mark("probe")
    # Shards of max_shard_size (the recipes' 1GB) rather than llm-compressor's one 20 GB file: the step hashes
    # each finished shard while the next is written (``digest.HashAhead``).
    shard = {"max_shard_size": config["params"]["max_shard_size"]} if "max_shard_size" in config["params"] else {}
    model.save_pretrained(out, save_compressed=True, **shard)
    PHASES.mark("save")
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "calibration_samples": len(ids)}
