"""The planner: a config becomes a small DAG of step specs, checked before anything heavy runs.

Each spec names its step, the backend that does it, its inputs (other specs), its resolved config, the
capability it needs and the tool versions it runs. Its cache key (``step_key``) is the hash of all of that plus
the digests of its inputs, so it is known as soon as its inputs exist, and the same key means the same bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from quantmill import constants as C
from quantmill.store import signing
from quantmill.registry.entries import check_name
from quantmill.backends import CONVERTERS, PUBLISHERS, QUANTIZERS, RUNTIMES, SOURCES
from quantmill.backends.base import SourceInfo
from quantmill.config import QuantmillConfig, StoreConfig
from quantmill.digest import canonical_json, sha256_bytes
from quantmill.errors import ConfigError, PreflightError, StoreFullError
from quantmill.toolchain.hardware import machine_class
from quantmill.store.local import ArtifactRef, LocalStore, Store
from quantmill.toolchain.versions import package_versions

# Bump a step's version when its output bytes change for the same inputs and config.
IMPLEMENTATION_VERSIONS = {C.DOWNLOAD: "2", C.MERGE: "1", C.CALIBRATE: "2", C.CONVERT: "1", C.QUANTIZE: "1",
                           C.VALIDATE: "2", C.PUBLISH: "2"}
BUNDLED_TEXT = Path(__file__).resolve().parents[1] / "bundled" / "text"
HIT, MISS, PENDING = "hit", "miss", "pending"


@dataclass(frozen=True)
class StepSpec:
    """One node of the plan.

    Attributes:
        id: Unique in the plan, e.g. ``quantize:gguf_q4_k_m``.
        step: The pipeline verb (download, calibrate, convert, quantize, validate, publish).
        backend: the key of the backend that does it, in its kind's table.
        capability: What the machine running it must offer (cpu, cuda, mlx, llamacpp), from its backend.
        inputs: Input name -> id of the spec that produces it.
        config: The resolved settings that determine the output: hashed into the key.
        context: Execution details that do not change the output (paths, labels, threads): not hashed.
        tools: Tool versions the step runs: hashed into the key.
        recipe: The recipe this spec belongs to (None for shared specs).
    """

    id: str
    step: str
    backend: str
    capability: str
    inputs: Mapping[str, str]
    config: Mapping[str, Any]
    context: Mapping[str, Any] = field(default_factory=dict)
    tools: Mapping[str, str] = field(default_factory=dict)
    recipe: str | None = None

    @property
    def impl_version(self) -> str:
        return IMPLEMENTATION_VERSIONS[self.step]


def step_key(spec: StepSpec, inputs: Mapping[str, ArtifactRef]) -> str:
    """The cache key: step, implementation version, backend, resolved config, tool versions, input digests."""
    missing = set(spec.inputs) - set(inputs)
    if missing:
        raise ValueError(f"{spec.id}: inputs {sorted(missing)} not resolved")
    return sha256_bytes(canonical_json({
        "step": spec.step, "implementation": spec.impl_version, "backend": spec.backend,
        "config": spec.config, "tools": spec.tools,
        "inputs": {name: inputs[name].digest for name in sorted(spec.inputs)},
    }))


@dataclass
class Plan:
    config: QuantmillConfig
    source: SourceInfo
    specs: dict[str, StepSpec]  # in topological order
    warnings: list[str] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # spec id -> pool (infra=prefect)

    def __iter__(self) -> Iterator[StepSpec]:
        return iter(self.specs.values())


@dataclass
class Resolution:
    """What the store already holds for each spec: ``hit`` (key known, artifact present), ``miss`` (key known,
    absent) or ``pending`` (an input is not built yet, so the key is not known yet and the step will run)."""

    status: dict[str, str]
    keys: dict[str, str]
    refs: dict[str, ArtifactRef]

    @property
    def all_cached(self) -> bool:
        return all(s == HIT for s in self.status.values())


def open_store_config(store: StoreConfig) -> Store:
    if store.kind == "local":
        return LocalStore(store.root, quota_bytes=store.quota_bytes)
    if store.kind == "s3":
        if not store.bucket:
            raise PreflightError("store.kind=s3 needs store.bucket (and store.endpoint_url for MinIO, R2 or a "
                                 "local S3 server)")
        from quantmill.store.s3 import S3Store

        return S3Store(store.bucket, store.prefix, endpoint_url=store.endpoint_url, region=store.region,
                       cache_dir=store.cache_dir)
    raise PreflightError(f"store.kind {store.kind!r} unknown; known: local, s3")


def open_store(cfg: QuantmillConfig) -> Store:
    return open_store_config(cfg.store)


def calibration_files(cfg: QuantmillConfig) -> list[Path]:
    """The calibration text files, resolved."""
    if cfg.calibration.source != "files":
        return []
    return text_files(list(cfg.calibration.files), "calibration.files")


def text_files(names: list[str], what: str) -> list[Path]:
    """Resolve text files; ``bundled:NAME`` is a text shipped with quantmill."""
    paths = []
    for name in names:
        path = BUNDLED_TEXT / name.removeprefix("bundled:") if name.startswith("bundled:") else Path(name)
        if not path.is_file():
            raise PreflightError(f"{what} file {name!r} not found ({path.resolve()}); fix {what}")
        paths.append(path.resolve())
    if not paths:
        raise PreflightError(f"{what} is empty; name at least one text file")
    return paths


def effective_gates(cfg: QuantmillConfig, name: str, recipe) -> dict[str, Any]:
    """validate.gates overridden field by field by the recipe's gates."""
    import dataclasses

    from quantmill.config import GateConfig

    known = [f.name for f in dataclasses.fields(GateConfig)]
    unknown = sorted(set(recipe.gates) - set(known))
    if unknown:
        raise ConfigError(f"recipe {name!r}: unknown gate(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {**dataclasses.asdict(cfg.validate.gates), **dict(recipe.gates)}


def _runtime_for(fmt: str):
    for key in RUNTIMES:
        runtime = RUNTIMES.get(key)
        if fmt in runtime.formats:
            return runtime
    raise PreflightError(f"no validation runtime for format {fmt!r}; known runtimes: {', '.join(RUNTIMES)}")


def target_fit(cfg: QuantmillConfig) -> list:
    """The target's recommended recipes with their estimated footprint, from config.json alone (no weights)."""
    from quantmill.estimate import fit_table

    if cfg.target.name == "none":
        return []
    model_config = SOURCES.get(cfg.model.source).read_config(cfg.model)
    return fit_table(model_config, cfg.target, cfg.recipe)


def _apply_target(cfg: QuantmillConfig) -> tuple[QuantmillConfig, list[str]]:
    """A copy of ``cfg`` without the recipes whose estimated footprint exceeds the target, and one warning per drop."""
    import dataclasses

    rows = {f.recipe: f for f in target_fit(cfg)}
    if not rows:
        return cfg, []
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    warnings = [f"target {cfg.target.name}: dropped {r} (needs about {gib(f.total_bytes)}, has {gib(f.budget_bytes)})"
                for r, f in rows.items() if r in cfg.recipe and not f.fits]
    fitting = {r: c for r, c in cfg.recipe.items() if r not in rows or rows[r].fits}
    if not fitting:
        smallest = min(rows.values(), key=lambda f: f.total_bytes)
        per_token = smallest.kv_cache_bytes / cfg.target.context
        room = smallest.budget_bytes - smallest.weights_bytes - smallest.overhead_bytes
        would_fit = (f"{smallest.recipe} would fit with target.context={int(room // per_token)} or less"
                     if room >= per_token * 256 else
                     f"no context fits: {smallest.recipe}'s weights alone need {gib(smallest.weights_bytes)}")
        raise PreflightError(
            f"target {cfg.target.name} ({gib(smallest.budget_bytes)}) is too small for every recipe it recommends "
            f"for model {cfg.model.name!r}: the smallest, {smallest.recipe}, needs about {gib(smallest.total_bytes)} "
            f"(weights {gib(smallest.weights_bytes)} + KV cache {gib(smallest.kv_cache_bytes)} at "
            f"{cfg.target.context} tokens); {would_fit}")
    return dataclasses.replace(cfg, recipe=fitting), warnings


def plan(cfg: QuantmillConfig, store: Store) -> Plan:
    """Preflight the config and build the DAG. Reads only model metadata (config.json, file list, headers).

    Raises:
        ConfigError / PreflightError / ModelSourceError: one line naming the problem and the fix.
    """
    if cfg.infra.mode not in ("embedded", "prefect"):
        raise ConfigError(f"infra.mode {cfg.infra.mode!r} unknown; choose infra=embedded or infra=prefect")
    if cfg.infra.queue_ahead < 0:
        raise ConfigError(f"infra.queue_ahead {cfg.infra.queue_ahead} is negative; use 0 (no bound) or more")
    cfg, warnings = _apply_target(cfg)
    model = cfg.model
    source = SOURCES.get(model.source)
    # Backend and recipe checks first: they need nothing from the model, so a typo fails before any download.
    recipes = {}
    for name, recipe in cfg.recipe.items():
        recipe, quantizer = _resolve_recipe(name, recipe)
        quantizer.check(name, recipe)
        recipes[name] = (recipe, quantizer, CONVERTERS.get(recipe.format))
    if cfg.infra.mode == "embedded":
        from quantmill.toolchain.hardware import check_here

        for name, (recipe, _, _) in recipes.items():
            check_here(name, recipe.requires)
    publisher = PUBLISHERS.get(cfg.publish.publisher) if cfg.publish.enabled else None
    if publisher is not None:
        publisher.check(cfg.publish, store)
        signer = signing.signer_from(cfg.publish.signing_key)  # a bad key path fails here, before any work
    if publisher is not None and not cfg.validate.enabled and cfg.validate.enforce:
        raise PreflightError("publishing needs a passed validation but validate.enabled=false; enable it, or set "
                             "validate.enforce=false to publish marked unvalidated, or publish.enabled=false")
    names = {r: check_name(cfg.publish.name_template.format(model=model.name, recipe=r)) for r in recipes}
    runtimes, gates = {}, {}
    if cfg.validate.enabled:
        for name, (recipe, _, _) in recipes.items():
            runtimes[name] = _runtime_for(recipe.format)
            if cfg.infra.mode == "embedded":  # with pools, `quantmill worker` checks what its pool offers
                runtimes[name].check_installed()
            gates[name] = effective_gates(cfg, name, recipe)
        eval_files = text_files(list(cfg.validate.eval_files), "validate.eval_files")

    cache = store.digest_cache()
    adapter_info = None
    if model.adapter:  # before the base: a wrong adapter is refused before anything is fetched
        from quantmill.plan import lora

        adapter_info = lora.describe(model, cache)
        lora.check_base(model, adapter_info)
    info = source.describe(model, cache)
    for name, (recipe, quantizer, converter) in recipes.items():
        converter.check(info, model.name)
        quantizer.check_model(name, recipe, info)
    if cfg.validate.enabled:
        _check_context(cfg, info, eval_files)

    threads = cfg.infra.threads
    specs: dict[str, StepSpec] = {}

    def add(spec: StepSpec) -> StepSpec:
        specs.setdefault(spec.id, spec)
        return specs[spec.id]

    download = add(StepSpec(
        id=C.DOWNLOAD, step=C.DOWNLOAD, backend=source.key, capability=C.CPU, inputs={},
        config={"identity": info.identity, "files": [f.path for f in info.files],
                "allow_pickle": model.allow_pickle, "trust_remote_code": model.trust_remote_code},
        context={"model": {"name": model.name, "source": model.source, "path": model.path,
                           "repo_id": model.repo_id, "revision": model.revision},
                 "source_info": info.to_json(), "link": cfg.store.link_sources,
                 "estimate_bytes": 0 if _linkable(cfg, info, store) else info.weights_bytes},
        tools=package_versions("huggingface_hub") if source.key == "hf" else {}))
    model_spec = download  # the checkpoint every later step starts from (the merge of an adapter, if any)
    if adapter_info is not None:
        adapter_download = add(StepSpec(
            id=f"{C.DOWNLOAD}:adapter", step=C.DOWNLOAD, backend=adapter_info.source, capability=C.CPU, inputs={},
            config={"identity": adapter_info.identity, "files": [f.path for f in adapter_info.files]},
            context={"model": {"name": f"{model.name}-adapter", "source": adapter_info.source, "path": model.adapter,
                               "repo_id": model.adapter, "revision": model.adapter_revision},
                     "source_info": adapter_info.to_json(), "link": cfg.store.link_sources, "role": "adapter"},
            tools=package_versions("huggingface_hub") if adapter_info.source == "hf" else {}))
        # From here on "the model" is the merged checkpoint: calibration, conversion, quantization, the
        # safetensors reference and the card all start from it.
        model_spec = add(StepSpec(
            id=C.MERGE, step=C.MERGE, backend="peft", capability=C.CPU,
            inputs={"base": download.id, "adapter": adapter_download.id}, config={},
            context={"estimate_bytes": info.weights_bytes}, tools=package_versions("peft", "transformers", "torch")))

    evalset = None
    if cfg.validate.enabled:
        from quantmill.digest import sha256_file

        v = cfg.validate
        evalset = add(StepSpec(
            id=f"{C.VALIDATE}:evalset", step=C.VALIDATE, backend="files", capability=C.CPU,
            inputs={"model": model_spec.id},
            config={"kind": "evalset", "texts": [{"name": p.name, "sha256": sha256_file(p)} for p in eval_files],
                    "n_ctx": v.n_ctx, "n_chunks": v.n_chunks, "prompt": v.prompt, "probes": list(v.probes)},
            context={"files": [str(p) for p in eval_files]},
            tools=package_versions("tokenizers", "transformers", "safetensors")))

    needs_calibration = any(q.needs_calibration(r) for r, q, _ in recipes.values())
    dataset = None
    if needs_calibration:
        files = calibration_files(cfg)
        from quantmill.digest import sha256_file

        cal = cfg.calibration
        dataset = add(StepSpec(
            id=f"{C.CALIBRATE}:dataset", step=C.CALIBRATE, backend=cal.source, capability=C.CPU,
            inputs={"model": model_spec.id},
            config={"kind": "dataset", "source": cal.source, "num_samples": cal.num_samples,
                    "seq_len": cal.seq_len, "seed": cal.seed, "min_samples": cal.min_samples,
                    "texts": [{"name": p.name, "sha256": sha256_file(p)} for p in files],
                    "dataset": cal.dataset, "split": cal.split, "text_field": cal.text_field},
            context={"files": [str(p) for p in files]},
            tools=package_versions("tokenizers", "safetensors", "numpy")))

    f16_estimate = info.weights_bytes * 2 // max(1, _bytes_per_param(info.config))
    for name, (recipe, quantizer, converter) in recipes.items():
        # The format's unquantized intermediate: what its recipes start from and are measured against.
        if converter.identity:
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
            if quantizer.needs_calibration(recipe) and quantizer.calibration_input == "dataset":
                inputs["calibration"] = dataset.id
            elif quantizer.needs_calibration(recipe):
                imatrix = add(StepSpec(
                    id=f"{C.CALIBRATE}:imatrix-{recipe.format}", step=C.CALIBRATE, backend="imatrix",
                    capability=quantizer.capability, inputs={"model": intermediate.id, "calibration": dataset.id},
                    config={"kind": "imatrix", "ctx": cfg.calibration.seq_len,
                            "chunks": cfg.calibration.num_samples},
                    context={"threads": threads}, tools=quantizer.tools()))
                inputs["imatrix"] = imatrix.id
            artifact = add(StepSpec(
                id=f"{C.QUANTIZE}:{name}", step=C.QUANTIZE, backend=quantizer.key,
                capability=C.CUDA if recipe.requires.device == C.CUDA else quantizer.capability,
                inputs=inputs, recipe=name,
                config={"method": recipe.method, "format": recipe.format, "quant_type": recipe.quant_type.upper(),
                        "imatrix": bool(recipe.imatrix), "params": dict(recipe.params),
                        **({"backend": recipe.backend} if recipe.backend else {})},
                context={"threads": threads, "estimate_bytes": quantizer.estimate_bytes(recipe, f16_estimate)},
                tools=quantizer.tools()))
        validation = None
        if cfg.validate.enabled:
            runtime = runtimes[name]
            # The unquantized model in the artifact's own runtime: computed once, shared by every recipe.
            reference = add(StepSpec(
                id=f"{C.VALIDATE}:reference-{converter.key}", step=C.VALIDATE, backend=runtime.key,
                capability=runtime.capability, inputs={"model": intermediate.id, "evalset": evalset.id},
                config={"kind": "reference"}, context={"threads": threads}, tools=runtime.tools()))
            validation = add(StepSpec(
                id=f"{C.VALIDATE}:{name}", step=C.VALIDATE, backend=runtime.key, capability=runtime.capability,
                inputs={"artifact": artifact.id, "evalset": evalset.id, "reference": reference.id}, recipe=name,
                config={"kind": "artifact", "max_tokens": cfg.validate.max_tokens, "gates": gates[name],
                        "estimate": _estimate(info, recipe, cfg.validate.n_ctx)},
                # The record holds speed and memory measured here, so the machine class is part of its key.
                context={"threads": threads}, tools={**runtime.tools(), "machine": measured_on(cfg, runtime.capability)}))
        if publisher is not None:
            inputs = {"artifact": artifact.id, "source": model_spec.id}
            if validation is not None:
                inputs["validation"] = validation.id
            add(StepSpec(
                id=f"{C.PUBLISH}:{name}", step=C.PUBLISH, backend=publisher.key, capability=C.CPU,
                inputs=inputs, recipe=name,
                config={"name": names[name], "model": model.name, "recipe": name, "format": recipe.format,
                        "base_model": info.base_model, "adapter": model.adapter, "tags": sorted(cfg.publish.tags),
                        "license": cfg.publish.license or info.license, "enforce": cfg.validate.enforce,
                        "destination": publisher.destination(cfg.publish),
                        "signed_by": signing.key_id(signer) if signer else None},
                context={"store_root": str(getattr(store, "root", "")),
                         "publish": {**dataclasses.asdict(cfg.publish), "cache_dir": cfg.store.cache_dir}}))
    routes = {}
    if cfg.infra.mode == "prefect":
        from quantmill.plan.routing import route

        routes = route(specs.values(), cfg.infra.pools)
    return Plan(cfg, info, specs, warnings, routes)


def measured_on(cfg: QuantmillConfig, capability: str) -> str:
    """What a validation's speed and memory figures are attributable to, part of its key: this machine's class
    when embedded, the pool's name with pools (a pool is one class of hardware)."""
    if cfg.infra.mode == "prefect":
        from quantmill.plan.routing import pool_for

        return f"pool {pool_for(capability, cfg.infra.pools)}"
    return machine_class()


def _resolve_recipe(name: str, recipe):
    """The recipe's quantizer backend (``backend``, else the method's own) and its format filled in."""
    import dataclasses

    quantizer = QUANTIZERS.get(recipe.backend or recipe.method)
    fmt = recipe.format or quantizer.default_format(recipe)
    if fmt not in quantizer.formats:
        raise PreflightError(f"recipe {name!r}: backend {quantizer.key!r} cannot produce format {fmt!r} (it makes: "
                             f"{', '.join(quantizer.formats)}); drop recipe.{name}.format or choose one of those")
    return dataclasses.replace(recipe, format=fmt), quantizer


def _estimate(info: SourceInfo, recipe, n_ctx: int) -> dict[str, int] | None:
    """The size estimate the target fit uses, recorded so the report can set it beside what was measured."""
    from quantmill.estimate import Shape, weights_bytes

    try:
        shape = Shape.from_config(info.config)
        weights = weights_bytes(shape, recipe.method, recipe.format, recipe.quant_type or "", recipe.params)
    except KeyError:
        return None
    return {"weights_bytes": weights, "kv_cache_bytes": shape.kv_cache_bytes(n_ctx)}


def _convert_config(fmt: str, cfg: QuantmillConfig) -> dict[str, Any]:
    """The settings of a format's intermediate (the first value names it in the spec id)."""
    if fmt == "gguf":
        return {"outtype": cfg.convert.gguf_outtype, "model_name": cfg.model.name}
    if fmt == "mlx":
        return {"dtype": cfg.convert.mlx_dtype}
    raise PreflightError(f"format {fmt!r} has no conversion settings; known: gguf, mlx, safetensors")


def _check_context(cfg: QuantmillConfig, info: SourceInfo, eval_files: list[Path]) -> None:
    """The evaluation window must fit the model, and the text must fill at least one window."""
    n_ctx = cfg.validate.n_ctx
    limit = info.config.get("max_position_embeddings")
    if limit and n_ctx > limit:
        raise PreflightError(f"validate.n_ctx {n_ctx} is beyond model {cfg.model.name!r}'s maximum context {limit} "
                             f"(max_position_embeddings); lower validate.n_ctx")
    if n_ctx < 8:
        raise PreflightError(f"validate.n_ctx {n_ctx} is too short to score anything; use 64 or more")
    root = Path(info.extra.get("root", ""))
    if (root / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in eval_files)
        n = len(tok.encode(text, add_special_tokens=False).ids)
        if n < n_ctx:
            raise PreflightError(f"evaluation text ({', '.join(p.name for p in eval_files)}) has {n} tokens, shorter "
                                 f"than one window of validate.n_ctx={n_ctx}; add text or lower validate.n_ctx")


def _linkable(cfg: QuantmillConfig, info: SourceInfo, store: Store) -> bool:
    """Whether download will hardlink rather than copy (same filesystem as the store, linking allowed)."""
    root = info.extra.get("root")
    if not cfg.store.link_sources or not root or not isinstance(store, LocalStore):
        return False
    return Path(root).stat().st_dev == store.root.stat().st_dev


def _bytes_per_param(config: Mapping[str, Any]) -> int:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 2)


def resolve(plan: Plan, store: Store) -> Resolution:
    """Look each spec's key up in the store, in topological order, as far as inputs are known."""
    status: dict[str, str] = {}
    keys: dict[str, str] = {}
    refs: dict[str, ArtifactRef] = {}
    for spec in plan:
        if all(i in refs for i in spec.inputs.values()):
            key = step_key(spec, {name: refs[sid] for name, sid in spec.inputs.items()})
            keys[spec.id] = key
            found = store.lookup(key)
            if found is not None and spec.step == C.PUBLISH and not _registered(spec, store, found):
                found = None
            if found is not None:
                refs[spec.id] = found
            status[spec.id] = HIT if found is not None else MISS
        else:
            status[spec.id] = PENDING
    return Resolution(status, keys, refs)


def _registered(spec: StepSpec, store: Store, ref: ArtifactRef) -> bool:
    """A publish is only cached if the registry still holds what it published."""
    return PUBLISHERS.get(spec.backend).is_published(spec, store, ref)


def check_space(plan: Plan, resolution: Resolution, store: Store) -> None:
    """Refuse to start when the steps that will run need more space than the store has (estimates)."""
    need = sum(int(spec.context.get("estimate_bytes", 0)) for spec in plan
               if resolution.status[spec.id] != HIT)
    if not isinstance(store, LocalStore) or need == 0:
        return
    free = store.free_bytes()
    if store.quota_bytes is not None:
        free = min(free, store.quota_bytes - store.used_bytes())
    if need > free:
        raise StoreFullError(f"store {store.root} has {free} bytes available but this run needs about {need}; "
                             f"free space, raise store.quota_bytes, or set store.root to a larger disk")
