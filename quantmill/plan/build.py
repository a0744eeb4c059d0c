"""Build: a config that passed preflight becomes the DAG of step specs (``Plan``). Nothing here checks anything;
``plan(cfg, store)`` is the two phases in order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import CONVERTERS, QUANTIZERS, SOURCES
from quantmill.backends.base import SourceInfo
from quantmill.config import QuantmillConfig
from quantmill.errors import PreflightError
from quantmill.plan.preflight import Checked, domain_gates, preflight
from quantmill.plan.records import (
    CalibrationSetRecord,
    ConvertRecord,
    DownloadRecord,
    EvalSetRecord,
    ImatrixRecord,
    MergeRecord,
    PublishRecord,
    QuantizeRecord,
    ReferenceRecord,
    SensitivityRecord,
    ValidationRecord,
)
from quantmill.plan.spec import Plan, StepSpec
from quantmill.store import signing
from quantmill.store.local import LocalStore, Store
from quantmill.toolchain.hardware import machine_class
from quantmill.toolchain.versions import package_versions


def plan(cfg: QuantmillConfig, store: Store) -> Plan:
    """Preflight the config, then build its DAG. Reads only model metadata (config.json, file list, headers).

    Raises:
        ConfigError / PreflightError / ModelSourceError: one line naming the problem and the fix.
    """
    return build(preflight(cfg, store), store)


def build(checked: Checked, store: Store) -> Plan:
    """The DAG of ``checked``: download (and merge), evaluation set, calibration, then per recipe its conversion,
    quantization, validation and publish; specs shared by recipes appear once."""
    cfg, info, recipes, model = checked.cfg, checked.info, checked.recipes, checked.cfg.model
    publisher, signer, adapter_info = checked.publisher, checked.signer, checked.adapter_info
    names, runtimes, gates, eval_files = checked.names, checked.runtimes, checked.gates, checked.eval_files
    source = SOURCES.get(model.source)
    threads = cfg.infra.threads
    specs: dict[str, StepSpec] = {}

    def add(spec: StepSpec) -> StepSpec:
        specs.setdefault(spec.id, spec)
        return specs[spec.id]

    download = add(StepSpec(
        id=C.DOWNLOAD, step=C.DOWNLOAD, backend=source.key, capability=C.CPU, inputs={},
        config=DownloadRecord(identity=info.identity, files=[f.path for f in info.files],
                              allow_pickle=model.allow_pickle, trust_remote_code=model.trust_remote_code).to_config(),
        context={"model": {"name": model.name, "source": model.source, "path": model.path,
                           "repo_id": model.repo_id, "revision": model.revision},
                 "source_info": info.to_json(), "link": cfg.store.link_sources,
                 "estimate_bytes": 0 if _linkable(cfg, info, store) else info.weights_bytes},
        tools=package_versions("huggingface_hub") if source.key == "hf" else {}))
    model_spec = download  # the checkpoint every later step starts from (the merge of an adapter, if any)
    if adapter_info is not None:
        adapter_download = add(StepSpec(
            id=f"{C.DOWNLOAD}:adapter", step=C.DOWNLOAD, backend=adapter_info.source, capability=C.CPU, inputs={},
            config=DownloadRecord(identity=adapter_info.identity, files=[f.path for f in adapter_info.files]).to_config(),
            context={"model": {"name": f"{model.name}-adapter", "source": adapter_info.source, "path": model.adapter,
                               "repo_id": model.adapter, "revision": model.adapter_revision},
                     "source_info": adapter_info.to_json(), "link": cfg.store.link_sources, "role": "adapter"},
            tools=package_versions("huggingface_hub") if adapter_info.source == "hf" else {}))
        # From here on "the model" is the merged checkpoint: calibration, conversion, quantization, the
        # safetensors reference and the card all start from it.
        model_spec = add(StepSpec(
            id=C.MERGE, step=C.MERGE, backend="peft", capability=C.CPU,
            inputs={"base": download.id, "adapter": adapter_download.id}, config=MergeRecord().to_config(),
            context={"estimate_bytes": info.weights_bytes}, tools=package_versions("peft", "transformers", "torch")))

    evalset, domain_sets = None, {}
    if cfg.validate.enabled:
        v = cfg.validate

        def evalset_of(suffix: str, files: list[Path], tasks: list[Path] = ()) -> StepSpec:
            """An evaluation set of ``files``: the same windows, smoke prompt and probes for every domain; the
            lm-eval tasks ride with the main one."""
            return add(StepSpec(
                id=f"{C.VALIDATE}:evalset{suffix}", step=C.VALIDATE, backend="files", capability=C.CPU,
                inputs={"model": model_spec.id},
                config=EvalSetRecord(texts=_texts(files), n_ctx=v.n_ctx, n_chunks=v.n_chunks, prompt=v.prompt,
                                     probes=list(v.probes), tasks=_texts(tasks) if tasks else None,
                                     task_limit=v.task_limit if tasks else None).to_config(),
                context={"files": [str(p) for p in files], "task_files": [str(p) for p in tasks]},
                tools={**package_versions("tokenizers", "transformers", "safetensors"),
                       **(package_versions("lm-eval") if tasks else {})}))

        evalset = evalset_of("", eval_files, checked.task_files)
        domain_sets = {d: evalset_of(f"-{d}", files) for d, files in checked.domain_files.items()}

    needs_calibration = any(q.needs_calibration(r) for r, q, _ in recipes.values())
    dataset = None
    if needs_calibration:
        files = checked.calibration_files
        dataset = add(StepSpec(
            id=f"{C.CALIBRATE}:dataset", step=C.CALIBRATE, backend=cfg.calibration.source, capability=C.CPU,
            inputs={"model": model_spec.id},
            config=CalibrationSetRecord.from_config(cfg.calibration, _texts(files)).to_config(),
            context={"files": [str(p) for p in files]},
            tools=package_versions("tokenizers", "safetensors", "numpy")))

    f16_estimate = info.weights_bytes * 2 // max(1, _bytes_per_param(info.config))

    def on_gpu(capability: str, wanted: bool = True) -> str:
        """With pools, the GPU variant of ``capability`` where a pool offers it (routing.prefer_gpu)."""
        if not wanted or cfg.infra.mode != "prefect":
            return capability
        from quantmill.plan.routing import prefer_gpu

        return prefer_gpu(capability, cfg.infra.pools)

    def imatrix_of(f16: StepSpec) -> StepSpec:
        """llama.cpp's importance matrix of the F16 GGUF over the calibration set."""
        gguf = QUANTIZERS.get("gguf")
        return add(StepSpec(
            id=f"{C.CALIBRATE}:imatrix-gguf", step=C.CALIBRATE, backend="imatrix", capability=on_gpu(gguf.capability),
            inputs={"model": f16.id, "calibration": dataset.id},
            config=ImatrixRecord(ctx=cfg.calibration.seq_len, chunks=cfg.calibration.num_samples).to_config(),
            context={"threads": threads}, tools=gguf.tools()))

    def gguf_sensitivity() -> tuple[str, str]:
        """The per-tensor sensitivity (measured on the F16 GGUF in llama.cpp) and the imatrix it used: the ids."""
        converter, convert_config = CONVERTERS.get("gguf"), _convert_config("gguf", cfg)
        f16 = add(StepSpec(
            id=f"{C.CONVERT}:gguf-{next(iter(convert_config.values()))}", step=C.CONVERT, backend=converter.key,
            capability=converter.capability, inputs={"model": model_spec.id}, config=convert_config,
            context={"estimate_bytes": f16_estimate}, tools=converter.tools()))
        imatrix = imatrix_of(f16)
        gguf = QUANTIZERS.get("gguf")
        return add(StepSpec(
            id=f"{C.CALIBRATE}:sensitivity-gguf", step=C.CALIBRATE, backend="sensitivity",
            capability=on_gpu(gguf.capability),
            inputs={"model": f16.id, "imatrix": imatrix.id, "calibration": dataset.id},
            config=SensitivityRecord.from_config(cfg.calibration.sensitivity).to_config(),
            context={"threads": threads}, tools=gguf.tools())).id, imatrix.id

    def quantize_spec(name: str, recipe: Any, quantizer: Any, inputs: dict[str, str]) -> StepSpec:
        return StepSpec(
            id=f"{C.QUANTIZE}:{name}", step=C.QUANTIZE, backend=quantizer.key,
            capability=C.CUDA if recipe.requires.device == C.CUDA else quantizer.capability,
            inputs=inputs, recipe=name,
            config=QuantizeRecord(method=recipe.method, format=recipe.format, quant_type=recipe.quant_type.upper(),
                                  imatrix=bool(recipe.imatrix), params=dict(recipe.params),
                                  backend=recipe.backend or None).to_config(),
            context={"threads": threads, "estimate_bytes": quantizer.estimate_bytes(recipe, f16_estimate)},
            tools=quantizer.tools())

    domain_validations: dict[str, dict[str, Any]] = {name: {} for name in recipes}
    for name, (recipe, quantizer, converter) in recipes.items():
        # The format's unquantized intermediate: what its recipes start from and are measured against.
        # A quantizer that reads the checkpoint itself (MLX, ONNX) needs it only as the validation reference.
        needed = (quantizer.is_intermediate(recipe) or quantizer.reads == "intermediate" or cfg.validate.enabled
                  or (quantizer.needs_calibration(recipe) and quantizer.calibration_input != "dataset"))
        if converter.identity or not needed:
            intermediate = model_spec
        else:
            convert_config = _convert_config(recipe.format, cfg)
            intermediate = add(StepSpec(
                id=f"{C.CONVERT}:{recipe.format}-{next(iter(convert_config.values()))}", step=C.CONVERT,
                backend=converter.key, capability=converter.capability, inputs={"model": model_spec.id},
                config=convert_config, context={"estimate_bytes": f16_estimate}, tools=converter.tools()))
        artifact = intermediate
        if not quantizer.is_intermediate(recipe):
            source = intermediate if quantizer.reads == "intermediate" else model_spec
            inputs = {"model": source.id}
            made_from = quantizer.source_recipe(recipe)
            if made_from is not None:  # a calibrated checkpoint of its own, keyed and cached like any other
                inputs["source"] = add(quantize_spec(f"{name}.source", made_from, QUANTIZERS.get(made_from.backend),
                                                     {"model": model_spec.id, "calibration": dataset.id})).id
            elif getattr(quantizer, "uses_sensitivity", False):  # one measurement, shared by every budget and format
                inputs["sensitivity"], imatrix = gguf_sensitivity()
                if quantizer.calibration_input == "imatrix":
                    inputs["imatrix"] = imatrix
            elif quantizer.needs_calibration(recipe) and quantizer.calibration_input == "dataset":
                inputs["calibration"] = dataset.id
            elif quantizer.needs_calibration(recipe):
                inputs["imatrix"] = imatrix_of(intermediate).id
            artifact = add(quantize_spec(name, recipe, quantizer, inputs))
        validation = None
        if cfg.validate.enabled:
            runtime = runtimes[name]
            # The unquantized model in the artifact's own runtime: computed once, shared by every recipe.
            # llama.cpp validates on a GPU pool where one has its CUDA build; an ONNX model built for CUDA runs
            # on ONNX Runtime's CUDA provider where a pool has it (its FP32 reference is a CPU model).
            reference_on = on_gpu(runtime.capability, runtime.key != "onnx")
            validate_on = on_gpu(runtime.capability, runtime.key != "onnx"
                                 or recipe.params.get("execution_provider") == C.CUDA)
            reference = add(StepSpec(
                id=f"{C.VALIDATE}:reference-{converter.key}", step=C.VALIDATE, backend=runtime.key,
                capability=reference_on, inputs={"model": intermediate.id, "evalset": evalset.id},
                config=ReferenceRecord(flip_prompts=cfg.validate.flip_prompts,
                                           flip_tokens=cfg.validate.flip_tokens).to_config(), context={"threads": threads}, tools=runtime.tools()))
            validation = add(StepSpec(
                id=f"{C.VALIDATE}:{name}", step=C.VALIDATE, backend=runtime.key, capability=validate_on,
                inputs={"artifact": artifact.id, "evalset": evalset.id, "reference": reference.id}, recipe=name,
                config=ValidationRecord(max_tokens=cfg.validate.max_tokens, gates=gates[name],
                                        estimate=_estimate(info, recipe, cfg.validate.n_ctx),
                                        offload_curve=cfg.validate.offload_curve or None,
                                        offload_tokens=(cfg.validate.offload_curve and cfg.validate.offload_tokens)
                                        or None).to_config(),
                # The record holds speed and memory measured here, so the machine class is part of its key.
                context={"threads": threads}, tools={**runtime.tools(), "machine": measured_on(cfg, validate_on)}))
            for domain, domain_set in domain_sets.items():  # one reference per domain, shared by every recipe
                domain_reference = add(StepSpec(
                    id=f"{C.VALIDATE}:reference-{converter.key}-{domain}", step=C.VALIDATE, backend=runtime.key,
                    capability=reference_on, inputs={"model": intermediate.id, "evalset": domain_set.id},
                    config=ReferenceRecord(flip_prompts=cfg.validate.flip_prompts,
                                           flip_tokens=cfg.validate.flip_tokens).to_config(), context={"threads": threads}, tools=runtime.tools()))
                domain_validations[name][domain] = add(StepSpec(
                    id=f"{C.VALIDATE}:{name}@{domain}", step=C.VALIDATE, backend=runtime.key,
                    capability=validate_on, recipe=name,
                    inputs={"artifact": artifact.id, "evalset": domain_set.id, "reference": domain_reference.id},
                    config=ValidationRecord(max_tokens=cfg.validate.max_tokens,
                                            gates=domain_gates(cfg, gates[name], domain),
                                            estimate=_estimate(info, recipe, cfg.validate.n_ctx)).to_config(),
                    context={"threads": threads},
                    tools={**runtime.tools(), "machine": measured_on(cfg, validate_on)}))
        if publisher is not None:
            inputs = {"artifact": artifact.id, "source": model_spec.id}
            if validation is not None:
                inputs["validation"] = validation.id
            for domain, domain_validation in domain_validations[name].items():
                inputs[f"validation@{domain}"] = domain_validation.id
            add(StepSpec(
                id=f"{C.PUBLISH}:{name}", step=C.PUBLISH, backend=publisher.key, capability=C.CPU,
                inputs=inputs, recipe=name,
                config=PublishRecord(name=names[name], model=model.name, recipe=name, format=recipe.format,
                                     base_model=info.base_model, adapter=model.adapter, tags=sorted(cfg.publish.tags),
                                     license=cfg.publish.license or info.license, enforce=cfg.validate.enforce,
                                     destination=publisher.destination(cfg.publish),
                                     signed_by=signing.key_id(signer) if signer else None).to_config(),
                context={"store_root": str(getattr(store, "root", "")),
                         "publish": {**dataclasses.asdict(cfg.publish), "cache_dir": cfg.store.cache_dir}}))
    routes = {}
    if cfg.infra.mode == "prefect":
        from quantmill.plan.routing import route

        routes = route(specs.values(), cfg.infra.pools)
    return Plan(cfg, info, specs, checked.warnings, routes)


def measured_on(cfg: QuantmillConfig, capability: str) -> str:
    """What a validation's speed and memory figures are attributable to, part of its key: this machine's class
    when embedded, the pool's name with pools (a pool is one class of hardware)."""
    if cfg.infra.mode == "prefect":
        from quantmill.plan.routing import pool_for

        return f"pool {pool_for(capability, cfg.infra.pools)}"
    return machine_class()


def _estimate(info: SourceInfo, recipe, n_ctx: int) -> dict[str, int] | None:
    """The size estimate the target fit uses, recorded so the report can set it beside what was measured."""
    from quantmill.estimate import Shape, weights_bytes

    try:
        shape = Shape.from_config(info.config)
        weights = weights_bytes(shape, recipe.method, recipe.format, recipe.quant_type or "", recipe.params)
    except KeyError:
        return None
    return {"weights_bytes": weights, "kv_cache_bytes": shape.kv_cache_bytes(n_ctx)}


def _texts(paths: list[Path]) -> list[dict[str, str]]:
    """Text files as a record names them: by name and content."""
    from quantmill.digest import sha256_file

    return [{"name": p.name, "sha256": sha256_file(p)} for p in paths]


def _convert_config(fmt: str, cfg: QuantmillConfig) -> dict[str, Any]:
    """The settings of a format's intermediate (the first value names it in the spec id)."""
    if fmt == "gguf":
        return ConvertRecord(outtype=cfg.convert.gguf_outtype, model_name=cfg.model.name).to_config()
    if fmt == "mlx":
        return ConvertRecord(dtype=cfg.convert.mlx_dtype).to_config()
    if fmt == "onnx":
        return ConvertRecord(dtype=cfg.convert.onnx_precision).to_config()
    raise PreflightError(f"format {fmt!r} has no conversion settings; known: gguf, mlx, onnx, safetensors")


def _linkable(cfg: QuantmillConfig, info: SourceInfo, store: Store) -> bool:
    """Whether download will hardlink rather than copy (same filesystem as the store, linking allowed)."""
    root = info.extra.get("root")
    if not cfg.store.link_sources or not root or not isinstance(store, LocalStore):
        return False
    return Path(root).stat().st_dev == store.root.stat().st_dev


def _bytes_per_param(config: Mapping[str, Any]) -> int:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 2)


