"""Validation runtime for GGUF: the project's pinned llama.cpp through its Python bindings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from quantmill import constants as C
from quantmill.backends import RUNTIMES
from quantmill.errors import PreflightError
from quantmill.toolchain.llamacpp import import_llama_cpp, locate
from quantmill.toolchain.versions import package_version

FLASH_ATTENTION = True


class LlamaCppRuntime:
    """Loads a GGUF, returns next-token logits for fixed token ids, and generates greedily."""

    key = "llamacpp"
    capability = C.LLAMACPP
    formats = ("gguf",)

    def check_installed(self) -> None:
        hint = ("run `make llama-cpp` here, or validate on a worker of a pool offering capability 'llamacpp' "
                "(quantmill worker checks it)")
        try:
            locate()
            import_llama_cpp()
        except PreflightError as e:
            raise PreflightError(f"runtime 'llamacpp' (validates format 'gguf') is not installed here: {e}; {hint}") from None
        except (ImportError, OSError) as e:
            raise PreflightError(f"runtime 'llamacpp' needs package 'llama-cpp-python' ({e}); {hint}") from None

    def tools(self) -> dict[str, str]:
        return {"llama.cpp": locate().version, "llama-cpp-python": package_version("llama_cpp_python"),
                "flash_attention": "on" if FLASH_ATTENTION else "off"}

    @staticmethod
    def model_file(artifact: Path) -> Path:
        files = sorted(artifact.glob("*.gguf"))
        if len(files) != 1:
            raise PreflightError(f"artifact {artifact} should hold one .gguf file, found {len(files)}")
        return files[0]

    @contextmanager
    def load(self, artifact: Path, *, n_ctx: int, threads: int = 0, gpu_layers: int = -1) -> Iterator[Any]:
        """``gpu_layers``: on a CUDA build, the layers offloaded to the GPU (-1: all of them, the output too)."""
        llama_cpp = import_llama_cpp()
        start = time.perf_counter()
        # Flash attention on: what llama.cpp's own tools resolve their default ("auto") to on CPU, so the numbers
        # are those users of llama.cpp get (it moves perplexity by ~0.02 % on the bundled model).
        on_gpu = locate().cuda and gpu_layers != 0  # a CUDA build validates with every layer on the GPU
        model = llama_cpp.Llama(str(self.model_file(artifact)), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                n_threads=threads or None, flash_attn=FLASH_ATTENTION, verbose=False, seed=0,
                                n_gpu_layers=gpu_layers if on_gpu else 0)
        model.device = "cuda" if on_gpu else "cpu"  # energy: the GPU's counter, where it runs there
        model.load_seconds = time.perf_counter() - start
        try:
            yield model
        finally:
            model.close()

    def logits(self, model: Any, ids: Sequence[int], first: int = 0) -> Any:
        """Logits at positions ``first..len(ids)-1`` ([len(ids) - first, n_vocab]) from an empty context.

        One batch, with outputs requested only where they are scored (as llama-perplexity does), so the vocabulary
        projection and the copy are skipped for the rest.
        """
        import numpy as np

        llama_cpp = import_llama_cpp()
        ctx = model._ctx.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        model.reset()  # the high-level state (used by generate) restarts from an empty context too
        batch = model._batch.batch
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= first
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on a batch of {len(ids)} tokens")
        n_vocab = model.n_vocab()
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(ids) - first, n_vocab))
        return out.copy()

    def offload_points(self, model: Any) -> list[int] | str:
        """The layer counts of the VRAM-wall curve: all (the output too), three quarters, half, a quarter, none; or
        why there is no curve here. Without a model: whether there can be one (an empty list if so)."""
        if not locate().cuda:
            return ("not measured: llama.cpp here is built without CUDA; validate on a worker of a pool offering "
                    "capability 'llamacpp-cuda'")
        if model is None:
            return []
        arch = model.metadata.get("general.architecture", "llama")
        n = int(model.metadata.get(f"{arch}.block_count", 0))
        return [n + 1, 3 * n // 4, n // 2, n // 4, 0] if n else "not measured: the file names no block count"

    def offloaded_bytes(self, artifact: Path, points: Sequence[int]) -> list[int]:
        """Weight bytes on the GPU at each point of the curve, from the file's own tensor table."""
        from quantmill.toolchain.gguf_info import offloaded_bytes

        return offloaded_bytes(self.model_file(artifact), points)

    def generate(self, model: Any, ids: Sequence[int], max_tokens: int) -> list[int]:
        """Greedy continuation of ``ids``: argmax at each step, stopping at end-of-sequence."""
        import numpy as np

        model.reset()
        model.eval(list(ids))
        out: list[int] = []
        eos = model.token_eos()
        for _ in range(max_tokens):
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
            if token == eos:
                break
            out.append(token)
            model.eval([token])
        return out

    def tokenize(self, model: Any, text: str) -> list[int]:
        """Ids of ``text`` as the artifact's own tokenizer encodes it (no BOS, special tokens not parsed)."""
        return model.tokenize(text.encode(), add_bos=False, special=False)

    def detokenize(self, model: Any, ids: Sequence[int]) -> str:
        return model.detokenize(list(ids)).decode(errors="replace")

    def special_ids(self, model: Any) -> dict[str, int]:
        return {"bos": model.token_bos(), "eos": model.token_eos()}

    def chat_template(self, model: Any) -> str | None:
        return model.metadata.get("tokenizer.chat_template")

    def bits_per_weight(self, artifact: Path) -> float:
        from quantmill.toolchain.gguf_info import bits_per_weight

        return bits_per_weight(self.model_file(artifact))


RUNTIMES.register(LlamaCppRuntime.key)(LlamaCppRuntime())
