"""The schemas of validation: what each artifact is measured on, and the gates it must pass to be published."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from quantmill.config.fields import bounded
from quantmill.config.probes import DEFAULT_PROBES


@dataclass
class GateConfig:
    """Thresholds an artifact must meet to be published; None disables a gate.

    Attributes:
        max_mean_kld: Mean KL divergence of next-token distributions against the reference (nats).
        max_p99_kld: 99th percentile of the per-token KL divergence.
        max_ppl_ratio: Perplexity over the reference model's perplexity on the same tokens.
        min_top1: Fraction of positions whose most likely token equals the reference's.
        tokenizer_exact: The artifact's tokenizer must encode every probe to the source tokenizer's ids and keep
            its special tokens and chat template.
        max_fallback_share: For k-quant GGUFs: the share of weights llama.cpp stored in another type because the
            type's blocks do not divide their rows (a narrow model); above it the recipe's type is not what the
            file holds.
        max_flip_rate: Share of the greedy continuations (``validate.flip_prompts``) that diverge from the
            reference's within ``validate.flip_tokens`` tokens.
        min_task_recovery: The lowest ratio, over ``validate.tasks``, of the artifact's accuracy to the unquantized
            model's.
    """

    max_mean_kld: Optional[float] = None
    max_p99_kld: Optional[float] = None
    max_ppl_ratio: Optional[float] = None
    min_top1: Optional[float] = None
    tokenizer_exact: bool = True
    max_fallback_share: Optional[float] = 0.5
    max_flip_rate: Optional[float] = None
    min_task_recovery: Optional[float] = None


@dataclass
class ValidateConfig:
    """Validation of each artifact in the runtime its users will load it with, against the unquantized model.

    Attributes:
        enabled: Run validation at all (publishing requires a passed validation unless enforce is off).
        enforce: Refuse to publish what failed; off publishes with an "unvalidated" mark.
        eval_files: Evaluation text (``bundled:NAME`` for texts shipped with quantmill).
        n_ctx: Context length of each evaluation window; n_chunks: windows evaluated. As in llama.cpp's
            ``llama-perplexity``, each window starts with BOS and its second half is scored.
        prompt: Text the smoke generation starts from; tokenized once by the source tokenizer, so every runtime
            is fed the same token ids. max_tokens: tokens generated greedily.
        probes: Strings the tokenizer-fidelity check encodes with both tokenizers.
        gates: Default thresholds; a recipe's ``gates`` override them field by field.
        flip_prompts: Greedy continuations compared with the reference's (the start of the first windows);
            flip_tokens: their length. Their share that diverges is ``flip_rate`` (0: none are generated).
        domains: Further domains each artifact is measured on, besides ``eval_files`` (prose): names of
            ``domain_texts``. Each has an evaluation set and a reference pass of its own, shared by every recipe.
        domain_texts: Domain name -> its evaluation texts (``bundled:code.txt``, local files).
        domain_gates: Domain name -> gates that override the recipe's for that domain (``code: {max_mean_kld: 0.1}``).
        tasks: lm-evaluation-harness task files (YAML over local data files; ``bundled:quantmill_cloze.yaml``) run on
            the unquantized model once and on each artifact in its runtime: accuracy and its ratio ("recovery").
        task_limit: Documents per task (0: all of them).
        offload_curve: Also measure generation speed and energy with all, 3/4, 1/2, 1/4 and none of the layers on
            the GPU (GGUF on a CUDA build of llama.cpp; elsewhere the record says why there is no curve).
        offload_tokens: Tokens generated at each point of that curve (0: max_tokens; at least 32). The points with
            most layers on the CPU are the slow ones: fewer tokens there keep a large model's curve short.
    """

    enabled: bool = True
    enforce: bool = True
    eval_files: List[str] = field(default_factory=lambda: ["bundled:eval.txt"])
    n_ctx: int = bounded(256, least=8)
    n_chunks: int = bounded(8, least=1)
    prompt: str = "The miller carried"
    max_tokens: int = bounded(16, least=0)
    probes: List[str] = field(default_factory=lambda: list(DEFAULT_PROBES))
    gates: GateConfig = field(default_factory=GateConfig)
    flip_prompts: int = bounded(4, least=0)
    flip_tokens: int = bounded(32, least=1)
    domains: List[str] = field(default_factory=list)
    domain_texts: Dict[str, List[str]] = field(default_factory=dict)
    domain_gates: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    tasks: List[str] = field(default_factory=list)
    task_limit: int = bounded(0, least=0)
    offload_curve: bool = False
    offload_tokens: int = bounded(0, least=0)
