"""Validation runtime for MLX models: mlx-lm (Metal on Apple silicon, CPU elsewhere)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from quantmill import constants as C
from quantmill.backends import RUNTIMES
from quantmill.backends.base import HfTokenizerMethods
from quantmill.backends.mlx_converter import require_mlx
from quantmill.toolchain.versions import package_versions


class MlxRuntime(HfTokenizerMethods):
    key = "mlx"
    capability = C.MLX
    formats = ("mlx",)

    def check_installed(self) -> None:
        require_mlx("runtime 'mlx' (validates format 'mlx')")

    def tools(self) -> dict[str, str]:
        return package_versions("mlx", "mlx-lm")

    @contextmanager
    def load(self, artifact: Path, *, n_ctx: int, threads: int = 0) -> Iterator[Any]:
        import mlx.core as mx
        from mlx_lm import load

        start = time.perf_counter()
        model, tokenizer = load(str(artifact))
        if _routes_experts(artifact) and mx.default_device() == mx.cpu:
            # mlx's CPU kernel that gathers expert weights takes float32 only; computing in float32 there is what
            # lets a mixture-of-experts model be evaluated on a CPU worker at all
            model.set_dtype(mx.float32)
        model.quantmill_tokenizer = tokenizer
        model.load_seconds = time.perf_counter() - start
        yield model

    def logits(self, model: Any, ids: Sequence[int], first: int = 0) -> Any:
        import mlx.core as mx
        import numpy as np

        out = model(mx.array([list(ids)]))[0, first:].astype(mx.float32)
        return np.array(out)

    def generate(self, model: Any, ids: Sequence[int], max_tokens: int) -> list[int]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        eos = model.quantmill_tokenizer.eos_token_id
        out: list[int] = []
        for token, _ in generate_step(mx.array(list(ids)), model, max_tokens=max_tokens,
                                      sampler=lambda logprobs: mx.argmax(logprobs, axis=-1)):
            token = int(token)
            if token == eos:
                break
            out.append(token)
        return out

    def bits_per_weight(self, artifact: Path) -> float:
        from quantmill.backends.mlx_quantizer import logical_bits

        return logical_bits(artifact)


def _routes_experts(artifact: Path) -> bool:
    import json

    config = json.loads((artifact / "config.json").read_text())
    return any(config.get(k, 0) > 1 for k in ("num_local_experts", "num_experts", "n_routed_experts"))


RUNTIMES.register(MlxRuntime.key)(MlxRuntime())
