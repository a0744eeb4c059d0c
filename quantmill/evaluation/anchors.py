"""Cross-checks against the anchor tool: llama.cpp's own ``llama-perplexity --kl-divergence``.

Used by the tests and the benchmarks to show quantmill's validation numbers beside llama.cpp's, computed on the
same tokens: llama-perplexity tokenizes the text and stores the token ids in its base file, and quantmill's
evaluation is then fed exactly those ids.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.evaluation.evaluate import EVALSET_META, EVALSET_TOKENS
from quantmill.toolchain.llamacpp import locate
from quantmill.toolchain.tools import run_tool

_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*(-?[\d.]+)",
    "ref_ppl_clamped": r"Mean PPL\(base\)\s*:\s*(-?[\d.]+)",
    "mean_kld": r"Mean\s+KLD:\s*(-?[\d.]+)",
    "p99_kld": r"99\.0%\s+KLD:\s*(-?[\d.]+)",
    "max_kld": r"Maximum KLD:\s*(-?[\d.]+)",
    "top1_agreement": r"Same top p:\s*(-?[\d.]+)",
}


def write_base(f16: Path, text: Path, base: Path, *, n_ctx: int, chunks: int, threads: int = 0) -> float:
    """``llama-perplexity --kl-divergence-base``: the F16 model's log-probs and the token ids. Returns seconds."""
    cmd: list[Any] = [locate().tool("llama-perplexity"), "-m", f16, "-f", text, "-c", n_ctx, "--chunks", chunks,
                      "--kl-divergence-base", base]
    if threads:
        cmd += ["-t", threads]
    return run_tool(cmd, name="llama-perplexity", label="llama-perplexity (base)").seconds


def kl_divergence(model: Path, base: Path, *, n_ctx: int, threads: int = 0) -> dict[str, float]:
    """``llama-perplexity --kl-divergence`` of ``model`` against ``base``; its summary figures and wall time."""
    cmd: list[Any] = [locate().tool("llama-perplexity"), "-m", model, "--kl-divergence-base", base,
                      "--kl-divergence", "-c", n_ctx]
    if threads:
        cmd += ["-t", threads]
    # llama.cpp's logger is asynchronous and deliberately never flushed at exit (ggml-org/llama.cpp#22142): on a
    # busy machine the summary is sometimes lost although the run succeeded. Run again when it is missing.
    for _ in range(3):
        start = time.perf_counter()
        run = run_tool(cmd, name="llama-perplexity", label="llama-perplexity (KLD)", tail_lines=300)
        out: dict[str, float] = {"seconds": time.perf_counter() - start}
        found = {key: re.search(pattern, run.tail) for key, pattern in _PATTERNS.items()}
        if all(found.values()):
            out.update({key: float(m.group(1)) for key, m in found.items()})
            out["top1_agreement"] /= 100
            return out
    missing = [key for key, m in found.items() if m is None]
    raise ValueError(f"llama-perplexity printed no {', '.join(missing)} in 3 runs (its output was cut short)")


def read_base_tokens(base: Path) -> tuple[int, int, np.ndarray]:
    """(n_ctx, n_vocab, tokens[n_chunk, n_ctx]) from a ``--kl-divergence-base`` file."""
    with open(base, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{base} is not a llama-perplexity base file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).reshape(n_chunk, n_ctx)
    return n_ctx, n_vocab, tokens


def read_base_logprobs(base: Path) -> list[np.ndarray]:
    """Per window, the base model's log-probabilities at the scored positions, as llama-perplexity stored them
    (16-bit: ``scale * q + min_log_prob``, with everything below ``max - 16`` clamped to ``min_log_prob``)."""
    n_ctx, n_vocab, tokens = read_base_tokens(base)
    n_scored = n_ctx - 1 - n_ctx // 2
    nv = 2 * ((n_vocab + 1) // 2) + 4
    offset = 8 + 12 + 4 * tokens.size
    raw = np.fromfile(base, dtype=np.uint16, offset=offset).reshape(tokens.shape[0], n_scored, nv)
    out = []
    for window in raw:
        head = np.ascontiguousarray(window[:, :4]).view(np.float32)  # (scale, min_log_prob) per position
        scale, min_log_prob = head[:, 0:1].astype(np.float64), head[:, 1:2].astype(np.float64)
        out.append(scale * window[:, 4: 4 + n_vocab] + min_log_prob)
    return out


def llamacpp_kld(base_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL divergence per position exactly as llama-perplexity sums it: only terms with base log-prob > -16."""
    keep = base_logp > -16.0
    return np.where(keep, np.exp(base_logp) * (base_logp - logp), 0.0).sum(axis=-1)


def evalset_from_base(base: Path, out: Path, *, bos: int, eos: int, prompt_ids: list[int]) -> None:
    """An evaluation set (quantmill's layout) holding exactly the token ids llama-perplexity evaluated."""
    from safetensors.numpy import save_file

    n_ctx, _, tokens = read_base_tokens(base)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": np.ascontiguousarray(tokens)}, str(out / EVALSET_TOKENS))
    (out / EVALSET_META).write_text(json.dumps({
        "n_ctx": n_ctx, "n_chunks": int(tokens.shape[0]), "prompt_ids": prompt_ids, "probes": [],
        "bos_id": bos, "eos_id": eos, "chat_template": None}))
