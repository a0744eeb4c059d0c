"""The quality metrics on hand-checkable inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantmill.evaluation.metrics import (
    Accumulator,
    check_gates,
    first_scored,
    log_softmax,
    scored_logprobs,
    targets,
    window_input,
)


def test_identical_distributions_have_zero_divergence():
    rng = np.random.default_rng(0)
    ref = log_softmax(rng.normal(size=(10, 50)))
    acc = Accumulator()
    acc.add(ref, ref, rng.integers(0, 50, size=10))
    s = acc.summary()
    assert s["mean_kld"] == pytest.approx(0, abs=1e-12)
    assert s["ppl_ratio"] == pytest.approx(1) and s["top1_agreement"] == 1.0


def test_kl_divergence_and_perplexity_by_hand():
    p = np.log(np.array([[0.5, 0.25, 0.25]]))
    q = np.log(np.array([[0.25, 0.5, 0.25]]))
    acc = Accumulator()
    acc.add(q, p, np.array([1]))
    s = acc.summary()
    expected_kld = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)  # = 0.25 ln 2
    assert s["mean_kld"] == pytest.approx(expected_kld)
    assert s["ppl"] == pytest.approx(2.0) and s["ref_ppl"] == pytest.approx(4.0)
    assert s["ppl_ratio"] == pytest.approx(0.5)
    assert s["top1_agreement"] == 0.0


def test_window_protocol_matches_llama_perplexity():
    n_ctx = 8
    tokens = np.arange(100, 108)
    assert window_input(tokens, bos=1) == [1, 101, 102, 103, 104, 105, 106, 107]
    assert first_scored(n_ctx) == 4
    assert targets(tokens, n_ctx).tolist() == [105, 106, 107]  # logits at 4, 5, 6 predict tokens 5, 6, 7
    logits = np.zeros((n_ctx, 3))
    assert scored_logprobs(logits, n_ctx).shape == (3, 3)


def test_gates_report_value_threshold_and_margin():
    metrics = {"mean_kld": 0.081, "p99_kld": 0.5, "ppl_ratio": 1.05, "top1_agreement": 0.9,
               "tokenizer": {"exact": True, "detail": "7 probes match"}}
    results = {r["name"]: r for r in check_gates(metrics, {"max_mean_kld": 0.06, "max_ppl_ratio": 1.10,
                                                          "max_p99_kld": None, "min_top1": 0.95,
                                                          "tokenizer_exact": True})}
    assert set(results) == {"max_mean_kld", "max_ppl_ratio", "min_top1", "tokenizer_exact"}
    assert not results["max_mean_kld"]["passed"]
    assert results["max_mean_kld"]["detail"] == "mean_kld 0.081 > 0.06 (by 0.021)"
    assert results["max_ppl_ratio"]["passed"]
    assert results["min_top1"]["detail"] == "top1_agreement 0.9 < 0.95 (by 0.05)"
    assert results["tokenizer_exact"]["passed"]


def test_flips_count_continuations_that_leave_the_reference_and_where():
    from quantmill.evaluation.metrics import flips

    reference = [[5, 6, 7, 8], [1, 2, 3], [9, 9], [4, 4, 4]]
    ours = [[5, 6, 7, 8], [1, 2, 0], [9], [4, 4, 4, 4]]  # same, a different token, stops early, goes on
    out = flips(ours, reference)
    assert out == {"flip_rate": 0.75, "flip_prompts": 4, "first_divergence": (2 + 1 + 3) / 3}
    assert flips([[1]], [[1]]) == {"flip_rate": 0.0, "flip_prompts": 1, "first_divergence": None}
