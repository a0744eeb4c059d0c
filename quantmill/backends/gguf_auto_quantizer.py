"""GGUF mixed precision toward a budget: a llama.cpp type per tensor, chosen from measured sensitivity.

The sensitivity artifact (``quantmill.evaluation.sensitivity``) gives, for every weight tensor and candidate type,
its exact size and its cost (KL divergence added when that tensor alone takes the type). The mix is the choice of
one type per tensor that minimises the summed cost within ``budget_bpw`` x all elements / 8 bytes (the whole file's
bits per weight, as llama.cpp reports them): a multiple-choice knapsack, solved by its Lagrangian (for a price per
byte each tensor takes its cheapest type; the price is bisected to the budget) and then filled greedily with the
upgrades that buy the most cost per byte. ``llama-quantize --tensor-type-file`` writes the file; the rules file is
kept beside it, so the same mix can be made by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import QUANTIZERS
from quantmill.backends.gguf_quantizer import GgufQuantizer, one_gguf
from quantmill.errors import PreflightError
from quantmill.toolchain.gguf_info import bits_per_weight
from quantmill.toolchain.llamacpp import locate
from quantmill.toolchain.tools import run_tool

RULES_FILE = "tensor-types.txt"
# The ways to say how large the file may be; preflight turns a target into a file size.
BUDGETS = ("budget_bpw", "budget_gib", "budget_target")
_TENSOR = re.compile(r"\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")
# The llama.cpp file type written in the header: the preset nearest the mix (every tensor is named by a rule).
_FTYPE_OF = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
             "Q4_0": "Q4_0", "Q5_0": "Q5_0", "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "IQ2_S": "IQ2_S"}


def type_bits(qtype: str) -> float:
    """Bits per element a ggml type stores (its block's bytes x 8 over its elements)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]]
    return 8 * size / block


def check_types(types: list[str]) -> None:
    from gguf import GGMLQuantizationType

    known = [t.name for t in GGMLQuantizationType]
    bad = [t for t in types if t.upper() not in known or t.upper() in ("F32", "F16", "BF16")]
    if bad or not types:
        raise PreflightError(f"calibration.sensitivity.types {list(types)!r}: {', '.join(bad) or 'empty'} is not a "
                             f"quantized ggml type; use e.g. Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, IQ4_XS")


def elements(config: Mapping[str, Any]) -> tuple[int, int]:
    """(weight-matrix elements, norm elements) of a Llama-style model of this config: the GGUF holds the same."""
    h, n = config["hidden_size"], config["num_hidden_layers"]
    v = config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or h // heads
    matrices = n * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * config["intermediate_size"])
    matrices += v * h * (1 if config.get("tie_word_embeddings") else 2)
    return matrices, (2 * n + 1) * h


def feasible_bpw(config: Mapping[str, Any], types: list[str]) -> float:
    """The smallest whole-file bits per weight a mix of ``types`` can reach for a model of this config: every
    weight matrix at the smallest type, the norms in F32 (an estimate from the config; the step checks exactly)."""
    matrices, norms = elements(config)
    smallest = min(type_bits(t) for t in types)
    return (matrices * smallest + norms * 32) / (matrices + norms)


def bpw_of_bytes(config: Mapping[str, Any], size_bytes: float) -> float:
    """The whole-file bits per weight of a file of ``size_bytes`` for a model of this config."""
    return 8 * size_bytes / sum(elements(config))


def choose_mix(sensitivity: Mapping[str, Any], budget_bytes: float) -> dict[str, str]:
    """Tensor -> type with the least summed cost whose bytes (with the fixed tensors) fit ``budget_bytes``.

    Raises:
        PreflightError: not even every tensor at its smallest type fits.
    """
    tensors = sensitivity["tensors"]
    types = sensitivity["types"]
    fixed = sensitivity["fixed_bytes"]

    def size(mix: Mapping[str, str]) -> int:
        return fixed + sum(tensors[n]["bytes"][t] for n, t in mix.items())

    def cheapest(price: float) -> dict[str, str]:
        return {n: min(types, key=lambda t: (d["kld"][t] + price * d["bytes"][t], d["bytes"][t]))
                for n, d in tensors.items()}

    smallest = {n: min(types, key=lambda t: d["bytes"][t]) for n, d in tensors.items()}
    if size(smallest) > budget_bytes:
        least = 8 * size(smallest) / sensitivity["total_elements"]
        raise PreflightError(f"budget_bpw {8 * budget_bytes / sensitivity['total_elements']:.3f} is below what the "
                             f"candidate types allow for this model ({least:.3f} with every tensor at its smallest "
                             f"type); raise budget_bpw to at least {least:.3f} or add a smaller type")
    low, high = 0.0, 1e-12
    while size(cheapest(high)) > budget_bytes:
        high *= 4
    for _ in range(64):
        mid = (low + high) / 2
        low, high = (mid, high) if size(cheapest(mid)) > budget_bytes else (low, mid)
    mix = cheapest(high)
    while True:  # spend what the price step left on the upgrades that buy the most per byte
        used, best = size(mix), None
        for n, d in tensors.items():
            for t in types:
                extra, gain = d["bytes"][t] - d["bytes"][mix[n]], d["kld"][mix[n]] - d["kld"][t]
                if extra > 0 and gain > 0 and used + extra <= budget_bytes and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, t)
        if best is None:
            return mix
        mix[best[1]] = best[2]


def check_budget(name: str, recipe: Any, method: str, extra: tuple[str, ...] = ()) -> None:
    """quant_type AUTO, one budget among ``BUDGETS`` of the right kind, and no params but those and ``extra``."""
    if (recipe.quant_type or "AUTO").upper() != "AUTO":
        raise PreflightError(f"recipe {name!r}: method {method!r} chooses the type of each tensor; quant_type "
                             f"{recipe.quant_type!r} should be AUTO (or use a method of one type)")
    params = recipe.params
    given = [k for k in BUDGETS if k in params]
    if len(given) != 1:
        raise PreflightError(f"recipe {name!r}: method {method!r} needs one budget: params.budget_bpw (bits per "
                             f"weight, e.g. 4.9), params.budget_gib (the file's size) or params.budget_target (a "
                             f"conf/target profile); got {', '.join(given) or 'none'}")
    budget = params[given[0]]
    number = not isinstance(budget, bool) and isinstance(budget, (int, float))
    if given[0] == "budget_bpw" and not (number and 1 <= budget <= 16):
        raise PreflightError(f"recipe {name!r}: params.budget_bpw {budget!r} should be bits per weight between 1 "
                             f"and 16 (a number, or a list of numbers for a ladder), e.g. 4.9")
    if given[0] == "budget_gib" and not (number and budget > 0):
        raise PreflightError(f"recipe {name!r}: params.budget_gib {budget!r} should be the file's size in GiB, "
                             f"e.g. 4.5")
    unknown = sorted(set(params) - {*BUDGETS, "budget_from", *extra})
    if unknown:
        raise PreflightError(f"recipe {name!r}: method {method!r} takes params "
                             f"{', '.join((*BUDGETS, *extra))} only (got {', '.join(unknown)})")


def budget_bytes(params: Mapping[str, Any], sensitivity: Mapping[str, Any]) -> float:
    """The tensors' bytes a budget allows: bits per weight over every element, or the file's size less the
    file's own header and metadata (measured on the uniform files)."""
    if "budget_gib" in params:
        return float(params["budget_gib"]) * 2**30 - sensitivity.get("header_bytes", 0)
    return float(params["budget_bpw"]) * sensitivity["total_elements"] / 8


def budget_label(params: Mapping[str, Any]) -> str:
    return f"{params['budget_gib']:.4g} GiB" if "budget_gib" in params else f"{params['budget_bpw']:.2f} bpw"


def predicted_kld(sensitivity: Mapping[str, Any], mix: Mapping[str, str]) -> float:
    return sum(sensitivity["tensors"][n]["kld"][t] for n, t in mix.items())


class GgufAutoQuantizer(GgufQuantizer):
    """F16 GGUF -> a GGUF whose tensors each have the type the sensitivity search chose for ``budget_bpw``."""

    key = "gguf_auto"
    uses_sensitivity = True

    def check(self, name: str, recipe: Any) -> None:
        check_budget(name, recipe, "gguf_auto")
        if not recipe.imatrix:
            raise PreflightError(f"recipe {name!r}: gguf_auto measures and quantizes with an importance matrix; set "
                                 f"recipe.{name}.imatrix=true")

    def needs_calibration(self, recipe: Any) -> bool:
        return True

    def estimate_bytes(self, recipe: Any, f16_bytes: int) -> int:
        if "budget_gib" in recipe.params:
            return int(recipe.params["budget_gib"] * 2**30)
        return int(f16_bytes * float(recipe.params["budget_bpw"]) / 16)

    def quantize(self, model_dir: Path, out_dir: Path, config: Mapping[str, Any], *, imatrix: Path | None,
                 threads: int, label: str, sensitivity: Path | None = None, **_: Path) -> dict[str, Any]:
        if sensitivity is None or imatrix is None:
            raise PreflightError(f"{label}: gguf_auto needs the sensitivity artifact and the imatrix as inputs")
        data = json.loads((sensitivity / C.SENSITIVITY_FILE).read_text())
        allowed = budget_bytes(config["params"], data)
        budget = 8 * allowed / data["total_elements"]
        mix = choose_mix(data, allowed)
        rules = out_dir / RULES_FILE
        rules.write_text("".join(f"{exact_pattern(n)}={t.lower()}\n" for n, t in sorted(mix.items())))
        counts: dict[str, int] = {}
        for t in mix.values():
            counts[t] = counts.get(t, 0) + 1
        dominant = max(counts, key=counts.get)
        quant_type = f"AUTO-{budget:.2f}"
        out = (out_dir / f"model-auto-{budget:.2f}.gguf").resolve()
        imatrix_file = one_gguf(imatrix)
        cmd: list[Any] = [locate().tool("llama-quantize"), "--imatrix", imatrix_file.name, "--tensor-type-file",
                          rules.resolve(), one_gguf(model_dir).resolve(), out, _FTYPE_OF.get(dominant, "Q8_0")]
        if threads:
            cmd.append(threads)
        run_tool(cmd, name="llama-quantize", label=label, progress=_TENSOR, cwd=imatrix_file.parent)
        from gguf import GGUFReader

        shares: dict[str, int] = {}
        for t in GGUFReader(out).tensors:
            if t.name in mix:
                shares[t.tensor_type.name] = shares.get(t.tensor_type.name, 0) + int(t.n_elements)
        total = sum(shares.values()) or 1
        return {"file": out.name, "quant_type": quant_type, "imatrix": True, "budget_bpw": round(budget, 4),
                "budget": budget_label(config["params"]),
                "bits_per_weight": round(bits_per_weight(out), 4), "mix": dict(sorted(mix.items())),
                "tensor_types": {k: round(v / total, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
                "predicted_kld": predicted_kld(data, mix), "sensitivity_method": data["method"],
                "rules_file": RULES_FILE}


def exact_pattern(tensor: str) -> str:
    """A ``--tensor-type`` pattern for exactly one tensor (llama.cpp matches with ``regex_search``)."""
    return "^" + re.escape(tensor) + "$"


QUANTIZERS.register(GgufAutoQuantizer.key)(GgufAutoQuantizer())
