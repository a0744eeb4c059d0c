"""One contract per kind of backend, checked for every backend registered in its table: a backend added later is
held to the same rules without a test of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantmill import constants as C
from quantmill.backends import CONVERTERS, PUBLISHERS, QUANTIZERS, RUNTIMES, SOURCES
from quantmill.config import PublishConfig, RecipeConfig
from quantmill.errors import PreflightError

CAPABILITIES = {C.CPU, C.CUDA, "mlx", "llamacpp", "onnx"}


def _versions_are_strings(tools: dict) -> bool:
    return isinstance(tools, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tools.items())


@pytest.mark.parametrize("key", list(QUANTIZERS))
def test_quantizer_contract(key):
    q = QUANTIZERS.get(key)
    assert q.key == key, "a quantizer registers under its own key (the key recipes name as backend or method)"
    assert q.capability in CAPABILITIES
    assert q.formats and all(isinstance(f, str) for f in q.formats)
    for fmt in q.formats:  # what it makes can be converted from and validated
        CONVERTERS.get(fmt)
        assert any(fmt in RUNTIMES.get(r).formats for r in RUNTIMES), f"no runtime validates {fmt}"
    assert _versions_are_strings(q.tools())


@pytest.mark.parametrize("key", list(QUANTIZERS))
def test_quantizer_refuses_a_scheme_it_does_not_know_in_one_line(key):
    q = QUANTIZERS.get(key)
    method = {"gguf": "gguf", "mlx": "mlx", "passthrough": "passthrough", "bitsandbytes": "bnb",
              "autoawq": "awq"}.get(key, "gptq")
    with pytest.raises(PreflightError) as refused:
        q.check("my_recipe", RecipeConfig(method=method, format=q.formats[0], quant_type="NOT_A_SCHEME"))
    message = str(refused.value)
    assert "\n" not in message and "'my_recipe'" in message and "NOT_A_SCHEME" in message, message


@pytest.mark.parametrize("fmt", list(CONVERTERS))
def test_converter_contract(fmt):
    converter = CONVERTERS.get(fmt)
    assert converter.capability in CAPABILITIES
    assert isinstance(converter.identity, bool)  # identity: the format's intermediate is the checkpoint itself
    assert _versions_are_strings(converter.tools())
    assert any(fmt in RUNTIMES.get(r).formats for r in RUNTIMES), f"no runtime validates {fmt}"


@pytest.mark.parametrize("key", list(RUNTIMES))
def test_runtime_contract(key):
    runtime = RUNTIMES.get(key)
    assert runtime.key == key and runtime.capability in CAPABILITIES
    assert runtime.formats and all(f in CONVERTERS for f in runtime.formats)
    assert _versions_are_strings(runtime.tools())


@pytest.mark.parametrize("key", list(SOURCES))
def test_source_contract(key):
    source = SOURCES.get(key)
    assert source.key == key
    assert callable(source.describe) and callable(source.read_config) and callable(source.dependency)


@pytest.mark.parametrize("key", list(PUBLISHERS))
def test_publisher_contract(key):
    publisher = PUBLISHERS.get(key)
    assert publisher.key == key
    assert callable(publisher.publish) and callable(publisher.is_published) and callable(publisher.check)
    assert isinstance(publisher.destination(PublishConfig(publisher=key, bucket="b", repo_id="org/repo")), str)


@pytest.mark.parametrize("table", [SOURCES, CONVERTERS, QUANTIZERS, RUNTIMES, PUBLISHERS], ids=lambda t: t.kind)
def test_an_unknown_key_names_the_known_ones(table):
    with pytest.raises(Exception) as unknown:
        table.get("no-such-backend")
    assert str(unknown.value) == f"unknown {table.kind} 'no-such-backend'; known: {', '.join(table)}"


def test_registering_a_key_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        QUANTIZERS.register("gguf")(object())


def test_importing_every_backend_imports_no_heavy_library():
    """Backends import their libraries inside their functions: a CPU worker, the CLI and --help start fast."""
    heavy = ("torch", "transformers", "llama_cpp", "mlx", "llmcompressor", "gptqmodel", "peft", "huggingface_hub",
             "boto3", "prefect", "safetensors", "numpy")
    code = f"import sys, quantmill.backends; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "", f"importing the backends imported: {proc.stdout.strip()}"
