"""Executing one spec against the store: the three things every task does.

1. Compute the key from the spec and its inputs' digests; if the store has it, return the reference.
2. Otherwise fetch the inputs by digest, call the step function into a staging directory.
3. Commit the staging directory with its provenance record (last), and return the new reference.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from quantmill import constants as C
from quantmill.backends import CONVERTERS, PUBLISHERS, QUANTIZERS, RUNTIMES, SOURCES, gguf_quantizer
from quantmill.backends.base import SourceInfo
from quantmill.config import ModelConfig
from quantmill.digest import HashAhead
from quantmill.errors import PreflightError, ToolError
from quantmill.estimate import Shape
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
    kind_of,
)
from quantmill.plan.spec import StepSpec, step_key
from quantmill.steps import calibrate, convert, download, merge, publish, quantize, validate
from quantmill.store import provenance
from quantmill.store.local import ArtifactRef, LocalStore, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What a task returns: a reference plus the small, JSON-able result of the step."""

    spec_id: str
    ref: ArtifactRef
    cached: bool
    seconds: float
    result: Mapping[str, Any] = field(default_factory=dict)


def local_texts(spec: StepSpec, files: str = "files", texts: str = "texts", bundled: str = "") -> list[Path]:
    """The spec's text files on this machine: the planned path, else quantmill's bundled copy (a worker's
    installation differs from the planner's); either must have the sha256 the key was computed from."""
    from quantmill.digest import sha256_file
    from quantmill.plan.preflight import BUNDLED_TEXT

    paths = []
    for planned, text in zip(spec.context.get(files, []), spec.config.get(texts) or []):
        for candidate in (Path(planned), BUNDLED_TEXT / bundled / text["name"]):
            if candidate.is_file() and sha256_file(candidate) == text["sha256"]:
                paths.append(candidate)
                break
        else:
            raise PreflightError(f"{spec.id}: text file {planned} (sha256 {text['sha256'][:12]}…) is not on this "
                                 f"machine; ship it with quantmill's bundled texts or on a path every worker has")
    return paths


# -- runners: a kind's record, the spec and its input paths -> the step function's call -------------------------
Runner = Callable[[Any, StepSpec, Mapping[str, Path], Path, Store], dict]


def _download(rec: DownloadRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    model = ModelConfig(**spec.context["model"])
    info = SourceInfo.from_json(spec.context["source_info"])
    cache = store.digest_cache()
    result = download.download(SOURCES.get(spec.backend), model, info, out, link=spec.context.get("link", False),
                               hasher=cache.sha256)
    cache.save()
    return result


def _merge(rec: MergeRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return merge.merge(inputs["base"], inputs["adapter"], out)


def _calibration_set(rec: CalibrationSetRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path,
                     store: Store) -> dict:
    return calibrate.calibrate_dataset(rec, inputs["model"], local_texts(spec), out)


def _imatrix(rec: ImatrixRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return calibrate.calibrate_imatrix(gguf_quantizer, gguf_quantizer.one_gguf(inputs["model"]), inputs["calibration"],
                                       out, ctx=rec.ctx, chunks=rec.chunks, threads=spec.context["threads"],
                                       label="imatrix")


def _sensitivity(rec: SensitivityRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return calibrate.calibrate_sensitivity(gguf_quantizer.one_gguf(inputs["model"]), gguf_quantizer.one_gguf(inputs["imatrix"]),
                                           inputs["calibration"], out, types=rec.types, method=rec.method,
                                           windows=rec.windows, max_measured=rec.max_measured,
                                           threads=spec.context["threads"])


def _convert(rec: ConvertRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return convert.convert(CONVERTERS.get(spec.backend), inputs["model"], out, rec.to_config())


def _quantize(rec: QuantizeRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    extra = {name: inputs[name] for name in ("calibration", "sensitivity", "source") if name in inputs}
    quantizer = QUANTIZERS.get(spec.backend)
    with HashAhead(out, store.digest_cache(), quantizer.renamed_when_complete) as ahead:
        result = quantize.quantize(quantizer, inputs["model"], out, rec.to_config(), imatrix=inputs.get("imatrix"),
                                   threads=spec.context["threads"], label=f"quantize {spec.recipe}", **extra)
    if ahead.hashed:
        result["hashed_while_writing"] = sorted(ahead.hashed)
    return result


def _evalset(rec: EvalSetRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return validate.make_evalset(inputs["model"], local_texts(spec), out, n_ctx=rec.n_ctx, n_chunks=rec.n_chunks,
                                 prompt=rec.prompt, probes=rec.probes,
                                 tasks=local_texts(spec, "task_files", "tasks", "tasks"), task_limit=rec.task_limit or 0)


def _reference(rec: ReferenceRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return validate.reference(RUNTIMES.get(spec.backend), inputs["model"], inputs["evalset"], out,
                              threads=spec.context["threads"], flips=(rec.flip_prompts, rec.flip_tokens))


def _validate(rec: ValidationRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    record = validate.validate(RUNTIMES.get(spec.backend), inputs["artifact"], inputs["evalset"], inputs["reference"],
                               gates=rec.gates, max_tokens=rec.max_tokens, threads=spec.context["threads"],
                               label=f"validate {spec.recipe}",
                               offload_curve=(rec.offload_tokens or rec.max_tokens) if rec.offload_curve else 0)
    record["estimate"] = rec.estimate
    (out / C.VALIDATION_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return {"status": record["status"], "failed": validate.failed_checks(record),
            **{k: record[k] for k in SUMMARY_METRICS if k in record}}


DOMAIN_METRICS = ("ppl_ratio", "mean_kld", "mean_kld_se", "p99_kld", "top1_agreement", "flip_rate")
SUMMARY_METRICS = ("ppl", "ref_ppl", "ppl_ratio", "mean_kld", "p99_kld", "top1_agreement", "size_bytes",
                   "bits_per_weight", "prompt_tokens_per_second", "generation_tokens_per_second",
                   "peak_rss_bytes", "peak_gpu_memory_bytes", "flip_rate", "tasks", "task_recovery")


def _publish(rec: PublishRecord, spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    validation = None
    if "validation" in inputs:
        validation = json.loads((inputs["validation"] / C.VALIDATION_FILE).read_text())
    domains = {k.partition("@")[2]: json.loads((inputs[k] / C.VALIDATION_FILE).read_text())
               for k in sorted(inputs) if k.startswith("validation@")}
    verdict = publish.with_domains(validation, domains)
    validated = publish.check_publishable(rec.name, verdict, enforce=rec.enforce)
    quant = json.loads((inputs["artifact"] / C.RESULT_FILE).read_text())
    artifact_ref = {k: spec.context["artifact_ref"][k] for k in ("key", "digest")}  # no local paths in bytes
    card = publish.model_card(name=rec.name, model=rec.model, base_model=rec.base_model, recipe=rec.recipe,
                              fmt=rec.format, quant=quant, validation=verdict, validated=validated,
                              artifact_digest=artifact_ref["digest"], tags=list(rec.tags), license=rec.license,
                              adapter=rec.adapter, made_by=publish.made_by(store.statement(artifact_ref["key"])),
                              files=sorted(str(f.relative_to(inputs["artifact"])) for f in inputs["artifact"].rglob("*")
                                           if f.is_file() and f.name not in (C.RESULT_FILE, *C.INTERNAL_FILES)),
                              domains=domains)
    (out / C.MODEL_CARD_FILE).write_text(card)
    if validation:
        from quantmill.evaluation import report

        row = {**{k: v for k, v in validation.items() if k not in ("generated_ids", "prompt_ids")},
               "recipe": rec.recipe, "format": rec.format,
               "quant_type": quant.get("quant_type") or quant.get("outtype", "").upper()}
        (out / C.REPORT_PAGE_FILE).write_text(report.render_html({"model": rec.name, "artifacts": [row]}))
    shape = Shape.from_config(json.loads((inputs["source"] / "config.json").read_text()))
    return {"name": rec.name, "artifact": artifact_ref, "validated": validated,
            "validation": {"status": validation["status"]} if validation else None,
            "metrics": {k: validation[k] for k in SUMMARY_METRICS if k in validation} if validation else {},
            **({"domains": {d: {"status": v["status"], **{k: v[k] for k in DOMAIN_METRICS if k in v}}
                            for d, v in domains.items()}} if domains else {}),
            "kv_cache_bytes_per_token": shape.kv_cache_bytes(1),
            **({"energy": validation["energy"]} if validation and "energy" in validation else {}),
            **({"measured_on": publish.machine_text(validation["machine"])} if validation and validation.get("machine")
               else {}),
            # What `plan target=` reads back for a target of the same GPU class (quantmill.registry.measured).
            **({"gpu": validation["machine"]["gpu"]} if validation and (validation.get("machine") or {}).get("gpu")
               else {}),
            **({"validated_n_ctx": validation["n_ctx"], "validated_in": validation["runtime"]}
               if validation and "n_ctx" in validation else {}),
            **({"offload_curve": validation["offload_curve"]}
               if validation and (validation.get("offload_curve") or {}).get("available") else {}),
            "recipe": rec.recipe, "model": rec.model, "format": rec.format,
            "quant_type": quant.get("quant_type") or quant.get("scheme") or quant.get("outtype", "").upper(),
            "bits_per_weight": quant.get("bits_per_weight"),
            **{k: quant[k] for k in ("quant_type_requested", "tensor_types", "fallback_share") if k in quant},
            "size_bytes": validation["size_bytes"] if validation else None}


# Each step kind (quantmill.plan.records.KINDS) and the function that runs it.
RUNNERS: dict[str, Runner] = {"download": _download, "merge": _merge, "dataset": _calibration_set,
                              "imatrix": _imatrix, "sensitivity": _sensitivity, "convert": _convert, "quantize": _quantize, "evalset": _evalset,
                              "reference": _reference, "artifact": _validate, "publish": _publish}


def call_step(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    """Call the step function of ``spec``'s kind with its record and input paths; its JSON-able result."""
    kind = kind_of(spec.step, spec.config)
    return RUNNERS[kind.name](kind.record.of(spec.config), spec, inputs, out, store)


def register(spec: StepSpec, store: Store, ref: ArtifactRef) -> dict[str, Any]:
    """Make a committed publish record visible where its publisher publishes (idempotent)."""
    return PUBLISHERS.get(spec.backend).publish(spec, store, ref)


def run_step(spec: StepSpec, inputs: Mapping[str, ArtifactRef], store: Store,
             run: provenance.RunInfo | None = None) -> StepResult:
    """Run ``spec`` unless the store already has its key; commit its output with provenance.

    A run that finds another computing the same key waits for it (the store's lock on the key) and reuses what it
    committed: two identical runs compute each step once."""
    run = run or provenance.RunInfo()
    key = step_key(spec, inputs)
    found = store.lookup_intact(key, spec.id)
    if found is None:
        with store.key_lock(key):
            return _run_step(spec, inputs, store, run, key)
    return _run_step(spec, inputs, store, run, key, found)


def _run_step(spec: StepSpec, inputs: Mapping[str, ArtifactRef], store: Store, run: provenance.RunInfo, key: str,
              found: ArtifactRef | None = None) -> StepResult:
    found = found or store.lookup_intact(key, spec.id)  # committed while this run waited for the key's lock
    if found is not None:
        if spec.step == C.PUBLISH:
            register(spec, store, found)
        return StepResult(spec.id, found, cached=True, seconds=0.0, result=store.read_result(found))

    if run.pool is not None:  # a worker makes only the bytes its key promises: the planned tool versions
        from quantmill.toolchain.versions import check_tools

        problems = check_tools(dict(spec.tools), pool=run.pool)
        if problems:
            raise PreflightError(f"worker {run.worker} (pool {run.pool}) cannot run {spec.id} as planned: "
                                 f"{'; '.join(problems)}; install the same versions on the planning machine and "
                                 f"every worker")
    paths = {name: store.verified_files(ref) for name, ref in inputs.items()}
    if spec.step == C.PUBLISH:
        spec = StepSpec(**{**spec.__dict__, "context": {**spec.context,
                                                       "artifact_ref": inputs["artifact"].to_json()}})
    started, t0 = provenance.now(), time.perf_counter()
    with store.stage(key) as staging:
        try:
            result = call_step(spec, paths, staging.files, store)
        except ToolError as e:
            if isinstance(store, LocalStore) and ("No space left" in str(e) or store.free_bytes() < 1 << 20):
                raise store.full_error() from e
            raise
        (staging.files / C.RESULT_FILE).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        finished = provenance.now()

        def statement(subjects, digest):
            dependencies = []
            if spec.step == C.DOWNLOAD:
                info = SourceInfo.from_json(spec.context["source_info"])
                if spec.context.get("role") == "adapter":
                    from quantmill.plan import lora

                    dependencies.append(lora.dependency(info))
                else:
                    dependencies.append(SOURCES.get(spec.backend).dependency(info))
            return provenance.statement(
                subjects=subjects, artifact_digest=digest, key=key, step=spec.step, spec_id=spec.id,
                impl_version=spec.impl_version, config=spec.config,
                inputs={name: ref.to_json() for name, ref in inputs.items()}, dependencies=dependencies,
                tools=spec.tools, run=run, started=started, finished=finished)

        ref = store.commit(staging, statement)
    if spec.step == C.PUBLISH:
        register(spec, store, ref)
    return StepResult(spec.id, ref, cached=False, seconds=time.perf_counter() - t0, result=result)
