"""Quality metrics of a quantized model against its reference, on fixed token ids (plain numpy).

The protocol is llama.cpp's ``llama-perplexity`` (so the numbers can be checked against it): the evaluation
tokens are cut into windows of ``n_ctx``; each window's first token is replaced by BOS; the logits at positions
``n_ctx // 2 .. n_ctx - 2`` predict the next token and are scored. KL divergence is
``sum_v p_ref(v) * (log p_ref(v) - log p_q(v))`` per scored position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def first_scored(n_ctx: int) -> int:
    return n_ctx // 2


def window_input(tokens: np.ndarray, bos: int) -> list[int]:
    """The ids fed to the model for one window: BOS in place of the first token."""
    ids = [int(t) for t in tokens]
    ids[0] = bos
    return ids


def scored_logprobs(logits: np.ndarray, n_ctx: int, offset: int = 0) -> np.ndarray:
    """Log-probabilities at the scored positions of one window ([n_ctx - 1 - n_ctx//2, vocab]); ``logits`` holds
    positions ``offset..`` (a runtime asked for the scored positions only passes ``offset=first_scored``)."""
    return log_softmax(logits[first_scored(n_ctx) - offset: n_ctx - 1 - offset])


def targets(tokens: np.ndarray, n_ctx: int) -> np.ndarray:
    return np.asarray(tokens[first_scored(n_ctx) + 1: n_ctx], dtype=np.int64)


def _standard_error(per_window: list[float]) -> float | None:
    if len(per_window) < 2:
        return None
    return float(np.std(per_window, ddof=1) / np.sqrt(len(per_window)))


def rank_correlation(a, b) -> float | None:
    """Spearman's rank correlation of two sequences (ties broken by order; the values here are continuous); None
    for fewer than three pairs."""
    a, b = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if a.size < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def flips(generated: list[list[int]], reference: list[list[int]]) -> dict[str, Any]:
    """How often a greedy continuation leaves the reference's, and where: the share of prompts whose continuation
    differs anywhere (a different token, or stopping earlier or later), and the mean index of the first difference."""
    first = []
    for ours, theirs in zip(generated, reference):
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if at is None and len(ours) != len(theirs):
            at = min(len(ours), len(theirs))
        first.append(at)
    diverged = [i for i in first if i is not None]
    return {"flip_rate": len(diverged) / len(first) if first else 0.0, "flip_prompts": len(first),
            "first_divergence": float(np.mean(diverged)) if diverged else None}


@dataclass
class Accumulator:
    """Per-position values over every scored position of every window."""

    nll: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)

    def add(self, logp: np.ndarray, ref_logp: np.ndarray | None, target: np.ndarray) -> None:
        rows = np.arange(len(target))
        self.nll.append(-logp[rows, target])
        if ref_logp is not None:
            ref_logp = ref_logp.astype(np.float64)
            self.ref_nll.append(-ref_logp[rows, target])
            self.kld.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
            self.same_top.append(logp.argmax(axis=-1) == ref_logp.argmax(axis=-1))

    def summary(self) -> dict[str, Any]:
        nll = np.concatenate(self.nll)
        out: dict[str, Any] = {"scored_tokens": int(nll.size), "ppl": float(np.exp(nll.mean()))}
        if self.kld:
            kld = np.concatenate(self.kld)
            ref_ppl = float(np.exp(np.concatenate(self.ref_nll).mean()))
            out.update({
                "ref_ppl": ref_ppl,
                "ppl_ratio": out["ppl"] / ref_ppl,
                "mean_kld": float(kld.mean()),
                "p99_kld": float(np.percentile(kld, 99)),
                "max_kld": float(kld.max()),
                "top1_agreement": float(np.concatenate(self.same_top).mean()),
                # standard errors over windows (positions within a window are not independent): how far another
                # text of the same size could move the figure
                "mean_kld_se": _standard_error([k.mean() for k in self.kld]),
                "top1_se": _standard_error([t.mean() for t in self.same_top]),
            })
        return out


GATE_METRICS = {"max_mean_kld": ("mean_kld", "<="), "max_p99_kld": ("p99_kld", "<="),
                "max_ppl_ratio": ("ppl_ratio", "<="), "min_top1": ("top1_agreement", ">="),
                "max_fallback_share": ("fallback_share", "<="), "max_flip_rate": ("flip_rate", "<="),
                "min_task_recovery": ("task_recovery", ">=")}
# Read from the file where its format has it, measured where flips or tasks are on: else no gate.
ARTIFACT_METRICS = frozenset({"fallback_share", "flip_rate", "task_recovery"})


def check_gates(metrics: dict[str, Any], gates: dict[str, Any]) -> list[dict[str, Any]]:
    """One result per active gate: value, threshold, passed, and by how much it missed."""
    results = []
    for gate, threshold in gates.items():
        if threshold is None or gate == "tokenizer_exact":
            continue
        metric, op = GATE_METRICS[gate]
        if metric in ARTIFACT_METRICS and metric not in metrics:
            continue
        value = metrics[metric]
        passed = value <= threshold if op == "<=" else value >= threshold
        detail = f"{metric} {value:.5g} {op} {threshold:g}" if passed else \
            f"{metric} {value:.5g} {'>' if op == '<=' else '<'} {threshold:g} (by {abs(value - threshold):.3g})"
        results.append({"name": gate, "passed": bool(passed), "value": value, "threshold": threshold,
                        "detail": detail})
    if gates.get("tokenizer_exact"):
        fidelity = metrics["tokenizer"]
        results.append({"name": "tokenizer_exact", "passed": fidelity["exact"], "value": fidelity["exact"],
                        "threshold": True, "detail": fidelity["detail"]})
    return results
