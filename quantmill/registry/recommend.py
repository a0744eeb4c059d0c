"""Which published artifact of a model to run on a target: the closest to the original by measured mean KL
divergence (on one domain, where asked) among those the target's runtimes load and its memory holds, with the
measured speed and energy beside it, and the reasons for every other artifact in one table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from quantmill.errors import NotFound
from quantmill.registry.operations import footprint_bytes

GIB = 2**30


@dataclass
class Choice:
    entry: dict[str, Any]
    need_bytes: int | None
    mean_kld: float | None
    usable: bool
    why: str


def _quality(entry: dict[str, Any], domain: str | None) -> dict[str, Any]:
    if domain and domain != "prose":
        return (entry.get("domains") or {}).get(domain) or {}
    return entry.get("metrics") or {}


def rank(entries: Iterable[dict[str, Any]], target: Any, formats: set[str], domain: str | None = None) -> list[Choice]:
    """Every validated artifact of the model, those the target can use first, closest to the original first."""
    budget = target.memory_gb * GIB
    choices = []
    for e in entries:
        need = footprint_bytes(e, target)
        kld = _quality(e, domain).get("mean_kld")
        if not e.get("validated"):
            why, usable = "not validated", False
        elif e["format"] not in formats:
            why, usable = f"{e['format']} is not a format {target.name}'s runtimes load ({', '.join(sorted(formats))})", False
        elif kld is None:
            why, usable = f"not measured on {domain}", False
        elif need is None:
            why, usable = "size unknown", False
        elif need > budget:
            why, usable = f"needs {need / GIB:.3g} GiB, more than {target.memory_gb:g}", False
        else:
            why, usable = f"fits ({need / GIB:.3g} of {target.memory_gb:g} GiB)", True
        choices.append(Choice(e, need, kld, usable, why))
    return sorted(choices, key=lambda c: (not c.usable, c.mean_kld if c.mean_kld is not None else float("inf"),
                                          c.need_bytes or 0))


def explain(choices: list[Choice], target: Any, model: str, domain: str | None = None) -> str:
    """One sentence: what is recommended and why, from the numbers; or why nothing is."""
    if not choices:
        raise NotFound(f"no published artifact of model {model!r}; check the name with quantmill ls, or name its "
                       f"config (model=hf model.repo_id=... or model=local model.path=...) for the recipe to build")
    usable = [c for c in choices if c.usable]
    where = f" on {domain}" if domain and domain != "prose" else ""
    if not usable:
        sized = [c for c in choices if c.need_bytes is not None]
        smallest = min(sized, key=lambda c: c.need_bytes) if sized else None
        hint = (f"; the smallest, {smallest.entry['name']}, needs {smallest.need_bytes / GIB:.3g} GiB at "
                f"{target.context} tokens of context" if smallest else "")
        return f"nothing of {model} can run on {target.name} ({target.memory_gb:g} GiB){hint}"
    best = usable[0]
    text = (f"{best.entry['name']}: the lowest mean KL divergence{where} ({best.mean_kld:.5f}) of the "
            f"{len(usable)} artifact(s) that {target.name} loads and holds in {target.memory_gb:g} GiB with "
            f"{target.context} tokens of KV cache")
    closer = [c for c in choices if not c.usable and c.mean_kld is not None and c.mean_kld < best.mean_kld]
    if closer:
        text += "; closer to the original but not usable there: " + ", ".join(
            f"{c.entry['name']} ({c.why})" for c in closer[:3])
    return text


def _row(rank: int | None, name: str, fmt: str, quant_type: str | None, *, need_bytes: int | None,
         size_bytes: int | None, verdict: str, mean_kld: float | None = None, tokens_per_second: float | None = None,
         joules: float | None = None, measured_on: Any = None) -> dict[str, Any]:
    return {"rank": rank, "name": name, "format": fmt, "quant_type": quant_type, "mean_kld": mean_kld,
            "size_bytes": size_bytes, "need_bytes": need_bytes, "generation_tokens_per_second": tokens_per_second,
            "joules_per_generated_token": joules, "measured_on": measured_on, "verdict": verdict}


def rows(choices: list[Choice]) -> list[dict[str, Any]]:
    """The table's rows: quality, size, footprint, measured speed and energy, and the verdict."""
    out = []
    for i, c in enumerate(choices):
        m, e = c.entry.get("metrics") or {}, c.entry.get("energy") or {}
        out.append(_row(i + 1 if c.usable else None, c.entry["name"], c.entry["format"], c.entry.get("quant_type"),
                        need_bytes=c.need_bytes, size_bytes=c.entry.get("size_bytes"), verdict=c.why,
                        mean_kld=c.mean_kld, tokens_per_second=m.get("generation_tokens_per_second"),
                        joules=e.get("joules_per_generated_token"), measured_on=c.entry.get("measured_on")))
    return out


def to_build(fits: list[Any], target: Any, model: str,
             kinds: dict[str, tuple[str, str | None]]) -> tuple[str, list[dict[str, Any]]]:
    """Nothing of the model is published: which of the target's recipes to build, the first in the target's order
    of preference (its decision table) whose footprint, estimated from the model's config, fits. ``fits`` are
    ``quantmill.estimate.Fit`` rows; ``kinds`` maps a recipe to its (format, quant_type). The sentence and the
    rows as ``rows`` writes them, marked as estimates."""
    order = [f.recipe for f in fits if f.available]
    usable = [f for f in fits if f.available and f.fits]
    out = []
    for f in fits:
        if not f.available:
            verdict = "not a recipe of this configuration"
        elif f.fits:
            verdict = f"fits ({f.total_bytes / GIB:.3g} of {target.memory_gb:g} GiB), estimate"
        else:
            verdict = f"needs {f.total_bytes / GIB:.3g} GiB, more than {target.memory_gb:g}, estimate"
        fmt, quant_type = kinds.get(f.recipe, ("", None))
        out.append(_row(usable.index(f) + 1 if f in usable else None, f.recipe, fmt, quant_type,
                        need_bytes=f.total_bytes, size_bytes=f.weights_bytes, verdict=verdict))
    out.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0))
    head = f"nothing of {model} is published yet"
    if not usable:
        sized = [f for f in fits if f.available]
        smallest = min(sized, key=lambda f: f.total_bytes, default=None)
        hint = (f"; the smallest, {smallest.recipe}, needs {smallest.total_bytes / GIB:.3g} GiB at {target.context} "
                f"tokens of context" if smallest else "")
        return f"{head}, and none of {target.name}'s recipes fits its {target.memory_gb:g} GiB by estimate{hint}", out
    best = usable[0]
    text = (f"{head}; build {best.recipe}: the first of {target.name}'s recipes ({', '.join(order)}) that fits "
            f"{target.memory_gb:g} GiB with {target.context} tokens of KV cache, by estimate from the model's config "
            f"({best.total_bytes / GIB:.3g} GiB: {best.weights_bytes / GIB:.3g} of weights)")
    passed = [f for f in fits if f.available and f.recipe in order[:order.index(best.recipe)]]
    if passed:
        text += "; before it in the table: " + ", ".join(
            f"{f.recipe} needs {f.total_bytes / GIB:.3g} GiB" for f in passed)
    return text, out
