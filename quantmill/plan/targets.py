"""A hardware target against a model: each recipe's footprint, estimated from config.json or measured where the
team registry holds the model's artifacts validated on the target's GPU class, and the recipes that fit."""

from __future__ import annotations

import dataclasses
from typing import Any

from quantmill.backends import SOURCES
from quantmill.backends.local_publisher import configured_registry
from quantmill.config import QuantmillConfig
from quantmill.errors import PreflightError, QuantmillError
from quantmill.store.local import Store


def target_fit(cfg: QuantmillConfig) -> list:
    """The target's recommended recipes with their estimated footprint, from config.json alone (no weights)."""
    from quantmill.estimate import fit_table

    if cfg.target.name == "none":
        return []
    model_config = SOURCES.get(cfg.model.source).read_config(cfg.model)
    return fit_table(model_config, cfg.target, cfg.recipe)


def measured_fit(cfg: QuantmillConfig, store: Store) -> tuple[list[dict[str, Any]], str | None]:
    """The target's fit rows (``target_fit``), measured where the team registry holds the model's artifacts
    validated on the target's GPU class (``quantmill.registry.measured``); a registry that cannot be read leaves the
    estimates, and the note says why."""
    from quantmill.registry import measured

    fits = target_fit(cfg)
    if not fits:
        return [], None
    entries, note = [], None
    if cfg.target.gpu:
        try:
            registry = configured_registry(cfg.publish, cfg.store.cache_dir, store)
            entries = registry.entries() if registry else []
        except QuantmillError as e:
            note = f"estimates only: the registry could not be read ({e})"
    return measured.apply(fits, entries, cfg.target, cfg.model.name), note


def apply_target(cfg: QuantmillConfig, store: Store) -> tuple[QuantmillConfig, list[str]]:
    """A copy of ``cfg`` without the recipes whose footprint (measured where it was, else estimated) exceeds the
    target, and one warning per drop."""
    fit, note = measured_fit(cfg, store)
    rows = {f["recipe"]: f for f in fit}
    if not rows:
        return cfg, []
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    how = {r: "" if f["source"] == "estimate" else f", {f['source']}" for r, f in rows.items()}
    warnings = [f"target {cfg.target.name}: dropped {r} (needs about {gib(f['total_bytes'])}{how[r]}, has "
                f"{gib(f['budget_bytes'])})" for r, f in rows.items() if r in cfg.recipe and not f["fits"]]
    warnings += [note] if note else []
    fitting = {r: c for r, c in cfg.recipe.items() if r not in rows or rows[r]["fits"]}
    if not fitting:
        smallest = min(rows.values(), key=lambda f: f["total_bytes"])
        per_token = smallest["kv_cache_bytes"] / cfg.target.context
        room = smallest["budget_bytes"] - smallest["weights_bytes"] - smallest["overhead_bytes"]
        name, weights = smallest["recipe"], smallest["weights_bytes"]
        would_fit = (f"{name} would fit with target.context={int(room // per_token)} or less"
                     if room >= per_token * 256 else f"no context fits: {name}'s weights alone need {gib(weights)}")
        raise PreflightError(
            f"target {cfg.target.name} ({gib(smallest['budget_bytes'])}) is too small for every recipe it recommends "
            f"for model {cfg.model.name!r}: the smallest, {name}, needs about {gib(smallest['total_bytes'])} "
            f"(weights {gib(weights)} + KV cache {gib(smallest['kv_cache_bytes'])} at {cfg.target.context} tokens); "
            f"{would_fit}")
    return dataclasses.replace(cfg, recipe=fitting), warnings
