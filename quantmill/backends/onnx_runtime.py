"""Validation runtime for ONNX models: ONNX Runtime for the logits, ONNX Runtime GenAI for generation and tokens.

The KL-divergence protocol needs the logits of every position of a window; ONNX Runtime GenAI's generator exposes
the last position's only, so the windows go through an ``onnxruntime.InferenceSession`` of the same ``model.onnx``
(an empty KV cache, the whole window at once). Greedy generation, the tokenizer (the one the builder wrote, checked
against the source tokenizer's ids) and the chat template come from ONNX Runtime GenAI, as users run the model.
Only one of the two holds the weights at a time, so the peak memory is the runtime's own.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from quantmill import constants as C
from quantmill.backends import RUNTIMES
from quantmill.backends.onnx_builder import logical_bits, require_onnx
from quantmill.toolchain.versions import package_versions

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxModel:
    """The artifact, with ONNX Runtime's session or ONNX Runtime GenAI's model loaded as needed."""

    def __init__(self, artifact: Path, threads: int):
        self.artifact, self.threads = artifact, threads
        self._session: Any = None
        self._genai: Any = None
        self._tokenizer: Any = None
        self.genai_config = json.loads((artifact / "genai_config.json").read_text())
        # A model built for CUDA runs on ONNX Runtime's CUDA provider where this machine has it (onnxruntime-gpu),
        # on the CPU provider otherwise (the same graph and weights), and the record says which.
        self.on_gpu = self._provider() == "cuda" and _cuda_provider()
        self.device = "cuda" if self.on_gpu else "cpu"
        self.execution = ("native" if self._provider() == "cpu" or self.on_gpu
                          else f"built for {self._provider()}, run on the CPU")

    def _provider(self) -> str:
        options = self.genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
        providers = [next(iter(p)) for p in options.get("provider_options", []) if p]
        return providers[0] if providers else "cpu"

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            self._genai = None
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.on_gpu else ["CPUExecutionProvider"]
            self._session = ort.InferenceSession(str(self.artifact / "model.onnx"), options, providers=providers)
        return self._session

    def genai(self) -> Any:
        if self._genai is None:
            import onnxruntime_genai as og

            self._session = None
            config = og.Config(str(self.artifact))
            if not self.on_gpu:
                config.clear_providers()  # the CPU, whatever the model was built for (validation runs here)
            self._genai = og.Model(config)
        return self._genai

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import onnxruntime_genai as og

            self._tokenizer = og.Tokenizer(self.genai())
        return self._tokenizer

    def close(self) -> None:
        self._session = self._genai = self._tokenizer = None


class OnnxRuntime:
    key = "onnx"
    capability = C.ONNX
    formats = ("onnx",)

    def check_installed(self) -> None:
        require_onnx("runtime 'onnx' (validates format 'onnx')")

    def tools(self) -> dict[str, str]:
        return package_versions("onnxruntime", "onnxruntime-genai")

    @contextmanager
    def load(self, artifact: Path, *, n_ctx: int, threads: int = 0) -> Iterator[Any]:
        start = time.perf_counter()
        model = OnnxModel(artifact, threads)
        model.session()
        model.load_seconds = time.perf_counter() - start
        try:
            yield model
        finally:
            model.close()

    def logits(self, model: OnnxModel, ids: Sequence[int], first: int = 0) -> Any:
        import numpy as np

        session = model.session()
        n = len(ids)
        feeds: dict[str, Any] = {}
        for spec in session.get_inputs():
            if spec.name == "input_ids":
                feeds[spec.name] = np.array([list(ids)], dtype=np.int64)
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((1, n), dtype=np.int64)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.arange(n, dtype=np.int64)[None, :]
            elif spec.name.startswith("past_key_values"):  # an empty cache: (batch 1, kv heads, 0, head size)
                decoder = model.genai_config["model"]["decoder"]
                shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
                feeds[spec.name] = np.zeros(shape, dtype=_DTYPES.get(spec.type, "float32"))
            else:
                raise ValueError(f"ONNX model input {spec.name!r} ({spec.type}) is not one quantmill can feed")
        (logits,) = session.run(["logits"], feeds)
        return np.asarray(logits[0, first:], dtype=np.float32)

    def generate(self, model: OnnxModel, ids: Sequence[int], max_tokens: int) -> list[int]:
        import onnxruntime_genai as og

        params = og.GeneratorParams(model.genai())
        params.set_search_options(do_sample=False, max_length=len(ids) + max_tokens)
        generator = og.Generator(model.genai(), params)
        generator.append_tokens(list(ids))
        out: list[int] = []
        while not generator.is_done() and len(out) < max_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            out.append(token)
        eos = self.special_ids(model)["eos"]
        return out[:out.index(eos)] if eos in out else out

    def tokenize(self, model: OnnxModel, text: str) -> list[int]:
        return [int(i) for i in model.tokenizer().encode(text)]

    def detokenize(self, model: OnnxModel, ids: Sequence[int]) -> str:
        return model.tokenizer().decode(list(ids))

    def special_ids(self, model: OnnxModel) -> dict[str, int]:
        config = model.genai_config.get("model", {})
        eos = config.get("eos_token_id")
        return {"bos": config.get("bos_token_id"), "eos": eos[0] if isinstance(eos, list) else eos}

    def chat_template(self, model: OnnxModel) -> str | None:
        template = model.artifact / "chat_template.jinja"
        if template.is_file():
            return template.read_text()
        config = model.artifact / "tokenizer_config.json"
        return json.loads(config.read_text()).get("chat_template") if config.is_file() else None

    def bits_per_weight(self, artifact: Path) -> float:
        return logical_bits(artifact)


RUNTIMES.register(OnnxRuntime.key)(OnnxRuntime())
