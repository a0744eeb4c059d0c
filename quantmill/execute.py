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
from quantmill.config import CalibrationConfig, ModelConfig
from quantmill.digest import HashAhead
from quantmill.errors import PreflightError, ToolError
from quantmill.estimate import Shape
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


def local_texts(spec: StepSpec) -> list[Path]:
    """The spec's text files on this machine: the planned path, else quantmill's bundled copy (a worker's
    installation differs from the planner's); either must have the sha256 the key was computed from."""
    from quantmill.digest import sha256_file
    from quantmill.plan.preflight import BUNDLED_TEXT

    paths = []
    for planned, text in zip(spec.context["files"], spec.config["texts"]):
        for candidate in (Path(planned), BUNDLED_TEXT / text["name"]):
            if candidate.is_file() and sha256_file(candidate) == text["sha256"]:
                paths.append(candidate)
                break
        else:
            raise PreflightError(f"{spec.id}: text file {planned} (sha256 {text['sha256'][:12]}…) is not on this "
                                 f"machine; ship it with quantmill's bundled texts or on a path every worker has")
    return paths


# -- adapters: spec + input paths -> step function call ----------------------------------------------------
Runner = Callable[[StepSpec, Mapping[str, Path], Path, Store], dict]


def _download(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    model = ModelConfig(**spec.context["model"])
    info = SourceInfo.from_json(spec.context["source_info"])
    cache = store.digest_cache()
    result = download.download(SOURCES.get(spec.backend), model, info, out, link=spec.context.get("link", False),
                               hasher=cache.sha256)
    cache.save()
    return result


def _merge(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return merge.merge(inputs["base"], inputs["adapter"], out)


def _calibrate(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    c = spec.config
    if c["kind"] == "dataset":
        cfg = CalibrationConfig(source=c["source"], num_samples=c["num_samples"], seq_len=c["seq_len"],
                                seed=c["seed"], min_samples=c["min_samples"], dataset=c["dataset"],
                                split=c["split"], text_field=c["text_field"])
        return calibrate.calibrate_dataset(cfg, inputs["model"], local_texts(spec), out)
    return calibrate.calibrate_imatrix(gguf_quantizer, gguf_quantizer.one_gguf(inputs["model"]), inputs["calibration"],
                                       out, ctx=c["ctx"], chunks=c["chunks"], threads=spec.context["threads"],
                                       label="imatrix")


def _convert(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    return convert.convert(CONVERTERS.get(spec.backend), inputs["model"], out, spec.config)


def _quantize(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    extra = {"calibration": inputs["calibration"]} if "calibration" in inputs else {}
    quantizer = QUANTIZERS.get(spec.backend)
    with HashAhead(out, store.digest_cache(), quantizer.renamed_when_complete) as ahead:
        result = quantize.quantize(quantizer, inputs["model"], out, spec.config, imatrix=inputs.get("imatrix"),
                                   threads=spec.context["threads"], label=f"quantize {spec.recipe}", **extra)
    if ahead.hashed:
        result["hashed_while_writing"] = sorted(ahead.hashed)
    return result


def _validate(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    c = spec.config
    if c["kind"] == "evalset":
        return validate.make_evalset(inputs["model"], local_texts(spec), out,
                                     n_ctx=c["n_ctx"], n_chunks=c["n_chunks"], prompt=c["prompt"],
                                     probes=c["probes"])
    runtime = RUNTIMES.get(spec.backend)
    if c["kind"] == "reference":
        return validate.reference(runtime, inputs["model"], inputs["evalset"], out, threads=spec.context["threads"])
    record = validate.validate(runtime, inputs["artifact"], inputs["evalset"], inputs["reference"], gates=c["gates"],
                               max_tokens=c["max_tokens"], threads=spec.context["threads"],
                               label=f"validate {spec.recipe}")
    record["estimate"] = c.get("estimate")
    (out / C.VALIDATION_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return {"status": record["status"], "failed": validate.failed_checks(record),
            **{k: record[k] for k in SUMMARY_METRICS if k in record}}


SUMMARY_METRICS = ("ppl", "ref_ppl", "ppl_ratio", "mean_kld", "p99_kld", "top1_agreement", "size_bytes",
                   "bits_per_weight", "prompt_tokens_per_second", "generation_tokens_per_second",
                   "peak_rss_bytes")


def _publish(spec: StepSpec, inputs: Mapping[str, Path], out: Path, store: Store) -> dict:
    c = spec.config
    validation = None
    if "validation" in inputs:
        validation = json.loads((inputs["validation"] / C.VALIDATION_FILE).read_text())
    validated = publish.check_publishable(c["name"], validation, enforce=c["enforce"])
    quant = json.loads((inputs["artifact"] / C.RESULT_FILE).read_text())
    artifact_ref = {k: spec.context["artifact_ref"][k] for k in ("key", "digest")}  # no local paths in bytes
    card = publish.model_card(name=c["name"], model=c["model"], base_model=c["base_model"], recipe=c["recipe"],
                              fmt=c["format"], quant=quant, validation=validation, validated=validated,
                              artifact_digest=artifact_ref["digest"], tags=list(c["tags"]), license=c["license"],
                              adapter=c.get("adapter"), made_by=publish.made_by(store.statement(artifact_ref["key"])))
    (out / C.MODEL_CARD_FILE).write_text(card)
    shape = Shape.from_config(json.loads((inputs["source"] / "config.json").read_text()))
    return {"name": c["name"], "artifact": artifact_ref, "validated": validated,
            "validation": {"status": validation["status"]} if validation else None,
            "metrics": {k: validation[k] for k in SUMMARY_METRICS if k in validation} if validation else {},
            "kv_cache_bytes_per_token": shape.kv_cache_bytes(1),
            "recipe": c["recipe"], "model": c["model"], "format": c["format"],
            "quant_type": quant.get("quant_type") or quant.get("outtype", "").upper(),
            "bits_per_weight": quant.get("bits_per_weight"),
            "size_bytes": validation["size_bytes"] if validation else None}


RUNNERS: dict[str, Runner] = {C.DOWNLOAD: _download, C.MERGE: _merge, C.CALIBRATE: _calibrate, C.CONVERT: _convert,
                              C.QUANTIZE: _quantize, C.VALIDATE: _validate, C.PUBLISH: _publish}


def register(spec: StepSpec, store: Store, ref: ArtifactRef) -> dict[str, Any]:
    """Make a committed publish record visible where its publisher publishes (idempotent)."""
    return PUBLISHERS.get(spec.backend).publish(spec, store, ref)


def run_step(spec: StepSpec, inputs: Mapping[str, ArtifactRef], store: Store,
             run: provenance.RunInfo | None = None) -> StepResult:
    """Run ``spec`` unless the store already has its key; commit its output with provenance."""
    run = run or provenance.RunInfo()
    key = step_key(spec, inputs)
    found = store.lookup(key)
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
            result = RUNNERS[spec.step](spec, paths, staging.files, store)
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
