"""Typed config schemas, one dataclass per group of ``conf/``, registered in Hydra's ConfigStore.

Composition merges the YAML files into these schemas, so an unknown key or a missing required value fails while
composing, before any planning or download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from quantmill.config.fields import bounded
from quantmill.config.probes import DEFAULT_PROBES  # noqa: F401 (re-exported)
from quantmill.config.quality import GateConfig, ValidateConfig  # noqa: F401 (GateConfig re-exported)


@dataclass
class ModelConfig:
    """The model to quantize.

    Attributes:
        name: Human name used in registry names (``<name>-<recipe>``).
        source: Model source backend: ``bundled``, ``local`` or ``hf``.
        path: Directory for ``local``; the bundled model's name for ``bundled``.
        repo_id: Hub repository for ``hf``.
        revision: Branch, tag or commit for ``hf``; resolved to a commit sha before anything is keyed.
        allow_pickle: Accept ``.bin`` (pickle) weights; off because unpickling runs code.
        trust_remote_code: Accept models that declare ``auto_map`` (custom code).
        adapter: A PEFT LoRA adapter to merge into the base before anything else: a local directory or a Hub
            repo id; its ``base_model_name_or_path`` must name this model.
        adapter_revision: Revision of a Hub adapter (resolved to a commit sha).
    """

    name: str = MISSING
    source: str = "local"
    path: Optional[str] = None
    repo_id: Optional[str] = None
    revision: str = "main"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    adapter: Optional[str] = None
    adapter_revision: str = "main"


@dataclass
class RequiresConfig:
    """The hardware a recipe's quantizer needs.

    Attributes:
        device: ``cuda`` (only on an NVIDIA GPU), ``cpu``, or ``any`` (CUDA when present, else CPU).
        min_gpu_memory_gb: GPU memory the quantizer needs at least (with device ``cuda``).
        min_compute_capability: Lowest CUDA compute capability with the kernels it needs (8.9: FP8; 10.0: FP4).
    """

    device: str = "any"
    min_gpu_memory_gb: Optional[float] = None
    min_compute_capability: Optional[float] = None


@dataclass
class RecipeConfig:
    """One target format. The file name under ``conf/recipe/`` is the recipe's name.

    Attributes:
        method: What is done: ``gguf`` (llama.cpp), ``mlx``, ``passthrough``, or a calibrated method
            (``gptq``, ``awq``, ``fp8``, ``nvfp4``, ``smoothquant``, ``bnb``).
        backend: Quantizer backend that does it, when not the method itself (``llmcompressor``, ``gptqmodel``,
            ``bitsandbytes``, ``autoawq``, ``autogptq``).
        format: Artifact format (``gguf``, ``mlx``, ``safetensors``, ``compressed-tensors``, ``gptq``, ``awq``,
            ``bnb``); selects the converter and the validation runtime. Unset: the backend's own format.
        quant_type: Backend-specific type or scheme name, e.g. llama.cpp's ``Q4_K_M``, llm-compressor's ``W4A16``.
        imatrix: Compute an importance matrix from the calibration set and quantize with it (GGUF).
        params: Extra backend options (group_size, ignore, ...), checked by the backend in preflight.
        gates: Validation thresholds for this recipe, overriding ``validate.gates`` field by field.
        requires: The hardware the quantizer needs; checked in preflight.
    """

    method: str = MISSING
    format: Optional[str] = None
    backend: Optional[str] = None
    quant_type: Optional[str] = None
    imatrix: bool = False
    description: str = ""
    params: Dict[str, Any] = field(default_factory=dict)
    gates: Dict[str, Any] = field(default_factory=dict)
    requires: RequiresConfig = field(default_factory=RequiresConfig)


@dataclass
class ConvertConfig:
    """The unquantized intermediate of each format: what its recipes quantize from and are validated against.

    Attributes:
        gguf_outtype: llama.cpp converter output type (f16, bf16, f32).
        mlx_dtype: dtype of the unquantized MLX model (float16, bfloat16, float32).
        onnx_precision: precision of the unquantized ONNX model, built for the CPU (fp32, fp16, bf16).
    """

    gguf_outtype: str = bounded("f16", choices=("f16", "bf16", "f32", "q8_0"))
    mlx_dtype: str = bounded("float16", choices=("float16", "bfloat16", "float32"))
    onnx_precision: str = bounded("fp32", choices=("fp32", "fp16", "bf16"))


@dataclass
class SensitivityConfig:
    """Each GGUF weight tensor's quality cost at each candidate type, measured once per model revision, imatrix and
    calibration set, shared by every ``gguf_auto`` recipe of the model.

    Attributes:
        types: Candidate llama.cpp types, one per tensor in a mix.
        method: ``measured``: each tensor alone at each type (the rest unquantized), its KL divergence on the
            calibration windows measured in llama.cpp; ``estimate``: imatrix-weighted squared error, scaled per tensor
            kind by one measured pass; ``auto``: measured up to ``max_measured`` passes, else estimate.
        windows: Calibration windows each measured pass evaluates.
    """

    types: List[str] = field(default_factory=lambda: ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    method: str = bounded("auto", choices=("auto", "measured", "estimate"))
    windows: int = bounded(8, least=1)
    max_measured: int = bounded(200, least=0)


@dataclass
class CalibrationConfig:
    """The calibration set shared by every recipe of a model that needs one.

    Attributes:
        source: ``files`` (text files; relative paths resolve against the project, ``bundled:`` against the
            package) or ``hf_dataset`` (a Hugging Face dataset by name, where there is network).
        files: Text files for ``files``.
        dataset, split, text_field: The dataset for ``hf_dataset``.
        num_samples: Number of sequences; seq_len: tokens per sequence; seed: sampling seed.
        min_samples: Fewer usable samples than this fails; between this and num_samples warns.
        sensitivity: Per-tensor sensitivity for mixed-precision recipes (``gguf_auto``).
    """

    source: str = bounded("files", choices=("files", "hf_dataset"))
    files: List[str] = field(default_factory=lambda: ["bundled:calibration.txt"])
    dataset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = bounded(64, least=1)
    seq_len: int = bounded(256, least=16)
    seed: int = 0
    min_samples: int = bounded(8, least=1)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)


@dataclass
class PublishConfig:
    """Where validated artifacts are published.

    Attributes:
        publisher: ``local`` (the registry folder inside the local store), ``s3`` (the team registry in a bucket:
            the same layout, with the artifacts) or ``hf`` (the Hugging Face Hub).
        name_template: Registry name; ``{model}`` and ``{recipe}`` are filled in.
        tags: Extra tags for the model card.
        license: License for the model card (defaults to the source model's, when it declares one).
        bucket, prefix, endpoint_url, region: The bucket of ``s3`` (credentials from the environment only).
        repo_id: ``hf``: the Hub repository, ``{model}``/``{recipe}``/``{name}`` filled in (e.g.
            ``my-org/{model}-GGUF``). hf_layout: ``repo`` (the repo holds one artifact), ``branch`` (a branch per
            recipe) or ``folder`` (a folder per recipe in one repo). private: create new repos private.
        split_max_gb: ``hf``: a GGUF larger than this is split with llama.cpp's ``llama-gguf-split`` (the Hub refuses
            files over 50 GB).
        signing_key: Private key (PEM) that signs each published provenance record (or $QUANTMILL_SIGNING_KEY);
            ``quantmill registry keygen`` makes a pair. trusted_keys: public keys ``pull``/``verify`` accept.
        catalogue: Rewrite the registry's catalogue page (index.html) after each publish.
    """

    enabled: bool = True
    publisher: str = "local"
    name_template: str = "{model}-{recipe}"
    tags: List[str] = field(default_factory=list)
    license: Optional[str] = None
    bucket: Optional[str] = None
    prefix: str = "quantmill"
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    repo_id: str = "{name}"
    hf_layout: str = "repo"
    private: bool = True
    split_max_gb: float = 45.0
    signing_key: Optional[str] = None
    trusted_keys: List[str] = field(default_factory=list)
    catalogue: bool = True


@dataclass
class StoreConfig:
    """The artifact store.

    Attributes:
        root: Directory of the local store; relative paths resolve against the working directory.
        quota_bytes: Refuse commits that would grow the store past this size.
        link_sources: Hardlink model files that are already on the store's filesystem (local directories,
            the HF cache) instead of copying them; every fetch re-checks them against their digests.
        bucket, prefix, endpoint_url, region: For ``kind: s3`` (AWS, MinIO, R2); credentials come from the
            environment or the worker, never from here.
        cache_dir: For ``kind: s3``, the worker-local cache of fetched artifacts (keyed by artifact key).
    """

    kind: str = bounded("local", choices=("local", "s3"))
    root: str = "artifacts"
    quota_bytes: Optional[int] = bounded(None, least=1)
    link_sources: bool = True
    bucket: Optional[str] = None
    prefix: str = "quantmill"
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    cache_dir: str = ".quantmill/s3-cache"


@dataclass
class PoolConfig:
    """A Prefect work pool and what its workers offer.

    Attributes:
        capabilities: What every worker of the pool has (``cpu``, ``cuda``, ``mlx``, ``llamacpp``); a step goes
            to the first pool, in file order, that offers the capability its backend declares.
        type: ``process`` (Prefect's process worker: each step run starts fresh interpreters on the worker's
            machine) or ``warm`` (quantmill's warm worker: each step run runs in the worker's own interpreter,
            with no process start; a run's job_variables cannot change its environment, see
            ``quantmill.prefect.warm_worker``).
        min_gpu_memory_gb: For ``cuda`` pools: ``quantmill worker`` refuses a machine with less.
        keep_quantizers: ``warm`` pools: after a calibrated quantization (AWQ, GPTQ, FP8, ...) the worker starts
            that backend's next process at once and keeps it waiting, torch and the library imported (10-20 s
            on a GPU machine), so the pool's next quantization starts computing at once. About 1 GB of memory
            per backend kept, no GPU memory. ``process`` pools start fresh interpreters per step run and keep
            nothing.
        job_variables: Passed to the pool's deployment (env, working_dir, ...).
    """

    capabilities: List[str] = field(default_factory=lambda: ["cpu"])
    type: str = "process"
    min_gpu_memory_gb: Optional[float] = None
    keep_quantizers: bool = True
    job_variables: Dict[str, Any] = field(default_factory=dict)


@dataclass
class InfraConfig:
    """Where steps run.

    Attributes:
        mode: ``embedded`` (one Prefect flow in this process, no server) or ``prefect`` (a parent flow sends each
            step to the work pool offering its capability, through a Prefect server; artifacts go through the
            store, which must then be reachable by every worker: ``store=s3``).
        max_parallel: Steps (embedded) or pool dispatches (prefect) in flight at once.
        threads: Threads for llama.cpp tools (0: all cores).
        prefect_home: PREFECT_HOME of embedded runs and of ``quantmill server``.
        api_url: The Prefect server (prefect mode); unset: $PREFECT_API_URL.
        pools: Pool name -> its capabilities (prefect mode).
        poll_seconds: How often the parent polls a dispatched step's state.
        queue_ahead: Per pool, how many of a parent's step runs may wait on the server for a worker (prefect
            mode); the parent holds its other ready steps and sends one each time a worker takes one. 0: send
            every ready step at once.
        pipeline_pool: The pool whose workers run whole submitted runs (``quantmill batch --submit``, the
            Prefect launcher, scheduled watches): the deployment ``quantmill-pipeline/<pool>``.
        server: The API server of embedded runs without ``api_url``: ``kept`` (one per ``prefect_home``, started
            by the first run that needs it, reused by later ones, stopping itself after ``server_idle_seconds``
            unused) or ``temporary`` (one per process, gone with it: nothing is left running).
        server_idle_seconds: How long a kept server waits for the next run before it stops.
    """

    mode: str = bounded("embedded", choices=("embedded", "prefect"))
    max_parallel: int = bounded(1, least=1)
    threads: int = bounded(0, least=0)
    prefect_home: str = ".quantmill/prefect"
    api_url: Optional[str] = None
    pools: Dict[str, PoolConfig] = field(default_factory=dict)
    poll_seconds: float = bounded(0.5, least=0.05)
    queue_ahead: int = bounded(4, least=0)
    pipeline_pool: str = "cpu"
    server: str = bounded("kept", choices=("kept", "temporary"))
    server_idle_seconds: float = bounded(600.0, least=1)


@dataclass
class TargetConfig:
    """A hardware profile: which recipes suit it (the decision table) and how much memory the model may use.

    Attributes:
        name: ``none`` (no target: the recipes are chosen by hand) or the profile's name.
        memory_gb: GiB available to weights + KV cache + runtime (VRAM, or the usable share of unified memory).
        runtime: What loads the model there (llamacpp, vllm, transformers, mlx, onnxruntime).
        recipes: Recommended recipes, best first; ``run target=NAME`` selects them and drops what does not fit.
        context: Tokens of KV cache the estimate reserves.
        overhead_gb: Runtime overhead beyond weights and KV cache.
        gpu: The GPU class (``H100``, ``RTX 4090``): ``quantmill plan target=...`` uses what the model's published
            artifacts measured on a GPU whose name holds it (size, memory, speed, the offload curve) over estimates.
    """

    name: str = "none"
    description: str = ""
    memory_gb: float = 0.0
    runtime: str = ""
    recipes: List[str] = field(default_factory=list)
    context: int = 4096
    overhead_gb: float = 0.5
    gpu: str = ""


@dataclass
class QuantmillConfig:
    """The root config: one model, the recipes to make from it, and how to run, validate and publish."""

    model: ModelConfig = MISSING
    recipe: Dict[str, RecipeConfig] = field(default_factory=dict)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    infra: InfraConfig = field(default_factory=InfraConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


SCHEMA_NAME = "quantmill_schema"
GROUP_SCHEMAS = {"model": ModelConfig, "convert": ConvertConfig, "calibration": CalibrationConfig, "validate": ValidateConfig,
                  "publish": PublishConfig, "store": StoreConfig, "infra": InfraConfig, "target": TargetConfig}


def register_schemas() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent; called before composing, never at import)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=QuantmillConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


