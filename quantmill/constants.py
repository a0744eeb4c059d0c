"""Persisted names, keys and URIs: each spelled once, here (gguf-py's constants.py style)."""

# Pipeline steps, in pipeline order.
DOWNLOAD = "download"
MERGE = "merge"
CALIBRATE = "calibrate"
CONVERT = "convert"
QUANTIZE = "quantize"
VALIDATE = "validate"
PUBLISH = "publish"
STEPS = (DOWNLOAD, MERGE, CALIBRATE, CONVERT, QUANTIZE, VALIDATE, PUBLISH)

# Capabilities a step can need; pools offer them.
CPU = "cpu"
CUDA = "cuda"
MLX = "mlx"
LLAMACPP = "llamacpp"  # the pinned llama.cpp build (converter, quantize/imatrix/perplexity tools, libllama)
ONNX = "onnx"  # ONNX Runtime and ONNX Runtime GenAI (its model builder), CPU execution provider
# GPU variants: where a pool offers one, the steps that run faster there (llama.cpp's imatrix, sensitivity and
# validations; validations of ONNX models built for CUDA) go to it, and to the CPU variant's pools otherwise.
LLAMACPP_CUDA = "llamacpp-cuda"  # the same pinned llama.cpp tree built with its CUDA backend, and an NVIDIA GPU
ONNX_CUDA = "onnx-cuda"  # ONNX Runtime's CUDA execution provider (onnxruntime-gpu, onnxruntime-genai-cuda)
GPU_VARIANTS = {LLAMACPP: LLAMACPP_CUDA, ONNX: ONNX_CUDA}
CAPABILITIES = (CPU, CUDA, MLX, LLAMACPP, ONNX, LLAMACPP_CUDA, ONNX_CUDA)

# Prefect names (infra=prefect): the flow every pool runs, one deployment per pool named after the pool.
STEP_FLOW = "quantmill-step"
PIPELINE_FLOW = "quantmill-pipeline"
BATCH_FLOW = "quantmill-batch"  # several configs in one parent run on pools
WATCH_FLOW = "quantmill-watch"
# The flows by entrypoint string (module path and function): workers import the installed package (no code pull),
# and the library loads flows by these names, never by importing flows/.
STEP_ENTRYPOINT = "flows.step.step"
PIPELINE_ENTRYPOINT = "flows.pipeline.pipeline"
POOLS_ENTRYPOINT = "flows.pipeline.pipeline_on_pools"
BATCH_ENTRYPOINT = "flows.pipeline.pipelines_on_pools"
WATCH_ENTRYPOINT = "flows.watch.watch"
WARM_POOL_TYPE = "quantmill-warm"  # the Prefect work-pool type of pools with `type: warm`
WORKER_LABEL = "prefect.worker.name"  # given by every Prefect worker to the runs it takes: who ran one

# Local store layout: <root>/objects/<key>/{files/..., provenance.json}
OBJECTS_DIR = "objects"
STAGING_DIR = "staging"
REGISTRY_DIR = "registry"
STATE_DIR = ".state"
DAMAGED_DIR = "damaged"  # artifacts whose files no longer match their record, moved aside
FILES_DIR = "files"
PROVENANCE_FILE = "provenance.json"  # written last: its presence commits the artifact
RESULT_FILE = "quantmill.json"  # small, deterministic step metadata, one of the artifact's files
DIGEST_INDEX_DIR = "by-digest"
DIGEST_CACHE_FILE = "digest-cache.json"

# Registry layout: <root>/registry/<name>/<version>/entry.json (+ README.md, the model card)
REGISTRY_ENTRY_FILE = "entry.json"
MODEL_CARD_FILE = "README.md"
REPORT_PAGE_FILE = "report.html"  # one artifact's validation page, beside its card

# Provenance: in-toto Statement v1 with a SLSA Provenance v1 predicate.
INTOTO_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://quantmill.dev/buildtypes/step/v1"
BUILDER_ID_EMBEDDED = "https://quantmill.dev/builders/embedded"
BUILDER_ID_POOL = "https://quantmill.dev/builders/prefect-pool"

# Validation record statuses.
PASSED = "passed"
FAILED = "failed"

# GGUF artifact file names.
GGUF_F16_FILE = "model-f16.gguf"
IMATRIX_FILE = "imatrix.gguf"
SENSITIVITY_FILE = "sensitivity.json"  # per-tensor sizes and costs at each candidate type (gguf_auto)
CALIBRATION_TOKENS_FILE = "calibration.safetensors"
CALIBRATION_TEXT_FILE = "calibration.txt"
VALIDATION_FILE = "validation.json"
PROBE_FILE = "quantmill-probe.safetensors"  # a quantized checkpoint's logits on fixed ids, right after quantizing
# Files an artifact keeps for the pipeline's own checks, never handed to users (published, pulled, exported).
INTERNAL_FILES = frozenset({PROBE_FILE})

# Environment variables.
ENV_LLAMA_CPP = "QUANTMILL_LLAMA_CPP"
ENV_CONF_DIR = "QUANTMILL_CONF"
ENV_DEBUG = "QUANTMILL_DEBUG"  # 1: tracebacks of user errors are kept
ENV_WORKER = "QUANTMILL_WORKER"  # set by `quantmill worker`: the worker's name, its pool and its local cache
ENV_POOL = "QUANTMILL_POOL"
ENV_CACHE_DIR = "QUANTMILL_CACHE_DIR"

# Validation: the tokens of each window's opening that greedy continuations (flips) start from.
FLIP_PROMPT_TOKENS = 16
