"""Backends, one table per kind (sources, converters, quantizers, runtimes, publishers). Importing this package registers every built-in backend; each backend
module is light (heavy libraries are imported inside its functions), so this import stays fast."""

from quantmill.backends.table import BackendTable

SOURCES: BackendTable = BackendTable("model source")
CONVERTERS: BackendTable = BackendTable("converter")
QUANTIZERS: BackendTable = BackendTable("quantizer")
RUNTIMES: BackendTable = BackendTable("runtime")
PUBLISHERS: BackendTable = BackendTable("publisher")

# Registration happens in these modules; the order does not matter.
from quantmill.backends import (  # noqa: E402,F401
    bnb_quantizer,
    gguf_auto_quantizer,
    gguf_converter,
    gguf_quantizer,
    gptqmodel_quantizer,
    hf_publisher,
    hf_source,
    legacy_quantizer,
    llamacpp_runtime,
    llmcompressor_quantizer,
    local_publisher,
    local_source,
    mlx_auto_quantizer,
    mlx_converter,
    mlx_quantizer,
    mlx_runtime,
    onnx_builder,
    onnx_runtime,
    passthrough_quantizer,
    s3_source,
    safetensors_converter,
    transformers_runtime,
)
