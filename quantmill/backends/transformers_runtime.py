"""Validation runtime for Hugging Face checkpoints (safetensors, compressed-tensors, AWQ, GPTQ) via transformers."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from quantmill import constants as C
from quantmill.backends import RUNTIMES
from quantmill.backends.base import HfTokenizerMethods
from quantmill.errors import PreflightError
from quantmill.toolchain.versions import package_versions


def execution_mode(artifact: Path, device: str) -> str:
    """``native``, or how a checkpoint whose kernels this device lacks is run: FP4 formats need compute capability
    10.0 (Blackwell), FP8 needs 8.9; without them compressed-tensors decompresses the weights (emulation); on CPU
    every quantized checkpoint runs decompressed."""
    import json

    quant = json.loads((artifact / "config.json").read_text()).get("quantization_config") or {}
    if not quant:
        return "native"
    fmt = str(quant.get("format") or quant.get("quant_method") or "")
    if device == "cpu":
        return f"emulated: {fmt or 'quantized'} weights decompressed on CPU"
    import torch

    major, minor = torch.cuda.get_device_capability()
    cc = major + minor / 10
    need = 10.0 if "fp4" in fmt.lower() else 8.9 if "float-quantized" in fmt else 0.0
    if cc < need:
        return f"emulated: {fmt} needs compute capability {need} for its kernels, {torch.cuda.get_device_name()} has {cc}"
    return "native"


def fp8_kernels(artifact: Path) -> bool:
    """Whether transformers' FP8 linear (``use_optimized_inference``) computes this checkpoint as its scheme says:
    FP8 weights with one scale per output channel or per tensor, activations quantized on the fly (FP8_DYNAMIC).
    That layer always quantizes activations per token, so a static input scale would be ignored and the error
    understated; block-scaled weights it cannot hold. Those stay on the compressed-tensors route."""
    import json

    quant = json.loads((artifact / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "float-quantized":
        return False
    groups = list((quant.get("config_groups") or {}).values())
    return bool(groups) and all(
        (g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 8
        and (g.get("weights") or {}).get("strategy") in ("channel", "tensor")
        and (g.get("input_activations") or {}).get("dynamic", True) is True for g in groups)


class TransformersRuntime(HfTokenizerMethods):
    """Loads a checkpoint directory with transformers (CUDA when present, else CPU in float32)."""

    key = "transformers"
    capability = C.CPU
    formats = ("safetensors", "compressed-tensors", "gptq", "awq", "bnb")

    def check_installed(self) -> None:
        import importlib.util

        for package in ("torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                raise PreflightError(f"runtime 'transformers' needs the {package!r} package (pip install {package}); "
                                     f"or run validation on a worker of a pool that has it")

    def tools(self) -> dict[str, str]:
        return package_versions("torch", "transformers", "compressed-tensors", "tokenizers")

    @contextmanager
    def load(self, artifact: Path, *, n_ctx: int, threads: int = 0) -> Iterator[Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        execution = execution_mode(artifact, device)
        dtype: Any = torch.float32 if device == "cpu" else "auto"
        if device != "cpu" and "fp4" in execution:
            dtype = torch.bfloat16  # emulated FP4 decompresses to bfloat16: the whole model must match it
        extra: dict[str, Any] = {}
        if device != "cpu" and execution == "native" and fp8_kernels(artifact):
            from transformers import CompressedTensorsConfig

            # Without it compressed-tensors decompresses FP8 to bfloat16 and fake-quantizes activations in eager code
            extra["quantization_config"] = CompressedTensorsConfig(use_optimized_inference=True)
        with warnings.catch_warnings():  # passing the loading attributes over the file's own config is the point
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(artifact, dtype=dtype, device_map=device, **extra)
        model.eval()
        model.quantmill_tokenizer = AutoTokenizer.from_pretrained(artifact)
        model.load_seconds = time.perf_counter() - start
        model.execution = execution
        try:
            yield model
        finally:
            del model

    def held_as(self, model: Any) -> str:
        """The load-time execution mode, unless the model has since decompressed its quantized layers: transformers'
        compressed-tensors route keeps packed weights only until the first forward, then holds them dense (the
        file's size is then no guide to the memory it takes, nor its speed to the format's kernels)."""
        if model.execution != "native":
            return model.execution
        fp8 = sum(type(m).__name__ == "CompressedTensorsFP8Linear" for m in model.modules())
        if fp8:
            return f"native: {fp8} linear layers in FP8 kernels (row-wise scaled matmul, activations per token)"
        dense = [m.weight.dtype for m in model.modules()
                 if "DECOMPRESSED" in str(getattr(m, "quantization_status", "")) and hasattr(m, "weight")]
        if not dense:
            return model.execution
        return (f"decompressed: {len(dense)} quantized layers held as {str(dense[0]).removeprefix('torch.')} after the "
                f"first forward (transformers' compressed-tensors route has no kernel for them)")

    def logits(self, model: Any, ids: Sequence[int], first: int = 0) -> Any:
        import torch

        with torch.inference_mode():
            batch = torch.tensor([list(ids)], device=model.device)
            return model(input_ids=batch).logits[0, first:].float().cpu().numpy()

    def generate(self, model: Any, ids: Sequence[int], max_tokens: int) -> list[int]:
        import torch

        with torch.inference_mode():
            batch = torch.tensor([list(ids)], device=model.device)
            out = model.generate(batch, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=model.quantmill_tokenizer.eos_token_id,
                                 pad_token_id=model.quantmill_tokenizer.eos_token_id)
        generated = out[0, len(ids):].tolist()
        eos = model.quantmill_tokenizer.eos_token_id
        return generated[: generated.index(eos)] if eos in generated else generated

    def bits_per_weight(self, artifact: Path) -> float:
        """Stored bits per model parameter. Packed checkpoints (GPTQ, AWQ, compressed-tensors, bitsandbytes) hold
        several parameters per stored element, so their parameters are counted from config.json's shape."""
        import json

        from quantmill.estimate import Shape
        from quantmill.toolchain.model_files import safetensors_bits, safetensors_tensors

        config = json.loads((artifact / "config.json").read_text())
        if "quantization_config" not in config:
            return safetensors_bits(artifact)
        stored = sum(t[3] for t in safetensors_tensors(artifact))
        return 8 * stored / Shape.from_config(config).params


RUNTIMES.register(TransformersRuntime.key)(TransformersRuntime())
