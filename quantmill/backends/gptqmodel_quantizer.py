"""``gptqmodel``: GPTQ and AWQ with GPTQModel, in its own checkpoint formats (``gptq``, ``awq``).

The alternative backend for the same recipes (``recipe.gptq_w4a16.backend=gptqmodel``). transformers loads its
output through optimum + gptqmodel. On CPU, GPTQModel refuses more worker threads than cores:
GPTQMODEL_CPU_WORKERS is set to the cores this process may use unless the environment sets it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantmill.backends import QUANTIZERS
from quantmill.backends.calibrated import CalibratedQuantizer
from quantmill.backends.quantizer_process import PHASES, LayerTracker, UserFacing, oom_names_layer, write_probe
from quantmill.config import RecipeConfig

BITS = {"W2A16": 2, "W3A16": 3, "W4A16": 4, "W8A16": 8}


class GptqModelQuantizer(CalibratedQuantizer):
    key = "gptqmodel"
    formats = ("gptq", "awq")
    schemes = {"gptq": tuple(BITS), "awq": ("W4A16",)}
    params = ("group_size", "ignore", "desc_act", "sym", "damp_percent", "targets", "max_shard_size")
    calibrated = ("gptq", "awq")
    module = __name__
    packages = ("gptqmodel", "torch", "transformers", "optimum")

    def default_format(self, recipe: RecipeConfig) -> str:
        return "awq" if recipe.method == "awq" else "gptq"


QUANTIZERS.register(GptqModelQuantizer.key)(GptqModelQuantizer())


def _cpu_workers() -> None:
    """GPTQModel's CPU worker threads must not exceed the cores; read when it is imported."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, len(os.sched_getaffinity(0)))))


def preload() -> None:
    """What ``run`` imports, imported by a child started ahead of its step."""
    _cpu_workers()
    import torch  # noqa: F401
    from gptqmodel import GPTQModel  # noqa: F401


def run(request: dict[str, Any], model_dir: Path, ids: list[list[int]], out: Path) -> dict[str, Any]:
    _cpu_workers()
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    PHASES.mark("imports")
    config, params = request["config"], request["config"]["params"]
    torch.manual_seed(0)
    if not ids:
        raise UserFacing(f"gptqmodel {config['method']} needs a calibration set; none was given")
    group = params.get("group_size", 128)
    options: dict[str, Any] = {"bits": BITS[config["quant_type"]], "group_size": group,
                               "sym": params.get("sym", True)}
    if "damp_percent" in params:
        options["damp_percent"] = params["damp_percent"]
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if config["method"] == "awq":
        options.update(quant_method=METHOD.AWQ, format=FORMAT.GEMM)
        if not cuda:
            kwargs["backend"] = BACKEND.AWQ_TORCH
    else:
        options["desc_act"] = params.get("desc_act", False)
    ignore = [p for p in params.get("ignore", ["lm_head"]) if p != "lm_head"]  # lm_head is never quantized here
    if ignore:
        options["dynamic"] = {f"-:{pattern}": {} for pattern in ignore}
    model = GPTQModel.load(str(model_dir), QuantizeConfig(**options))
    PHASES.mark("load")
    tracker = LayerTracker(model.model)
    rows = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in ids]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with oom_names_layer(tracker, config, len(ids), len(ids[0])):
        model.quantize(rows, batch_size=min(len(rows), 8), **kwargs)
    tracker.remove()
    PHASES.mark("quantize")
    model.save(str(out), **({"max_shard_size": params["max_shard_size"]} if "max_shard_size" in params else {}))
    for stray in ("quant_log.csv",):  # a per-run timing log: it would make the bytes differ run to run
        (out / stray).unlink(missing_ok=True)
    del model
    PHASES.mark("save")
    # GPTQModel packs the weights as it saves: its own loader gives the model as quantized.
    write_probe(GPTQModel.load(str(out), **({} if cuda else {"dtype": torch.float32})), out, ids)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "calibration_samples": len(ids)}
