"""Batches and runs: every pipeline a repository's ``conf/`` describes, expanded to one run per model × recipe.

A *run* is one recipe of one model (at one target), composed from ``conf/``. Its *fingerprint* is the part of
the resolved config that decides what the run makes and publishes: the model, the recipe with its effective
gates, the format's conversion settings, the calibration set when the recipe uses one, validation, publishing,
the store and the target. Where it runs (``infra``) is not part of it. Two revisions of ``conf/`` that give a
run the same fingerprint make the same artifacts, so a trigger skips it.

Runs come from ``conf/config.yaml`` (origin ``pipeline``) and from each batch file ``conf/batch/NAME.yaml``::

    recipes: [gguf_q8_0, gguf_q4_k_m]      # default recipes of the models below
    targets: []                            # optional: hardware profiles (recipes from their table if none given)
    overrides: [validate.n_chunks=4]       # Hydra overrides for every run of the batch
    models:
      - tiny_llama                         # a conf/model option with the batch's recipes
      - model: local                       # or a mapping, with its own overrides, recipes, targets
        overrides: [model.path=/models/llama-3-8b, model.name=llama-3-8b]
        recipes: [gguf_q4_k_m, awq_w4a16]
    watch:
      cron: "0 3 * * *"                    # `quantmill deploy` schedules `quantmill watch NAME` with it
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from quantmill.config import QuantmillConfig, compose, known_options, to_dict
from quantmill.errors import ConfigError

BATCH_DIR = "batch"
PIPELINE_ORIGIN = "pipeline"
_BATCH_KEYS = {"description", "recipes", "targets", "overrides", "models", "watch"}
_ENTRY_KEYS = {"model", "recipes", "targets", "overrides"}
_WATCH_KEYS = {"cron", "timezone"}


class BatchError(ConfigError):
    """A batch file is malformed or names something conf/ does not have; the message starts with FILE:LINE."""


@dataclass(frozen=True)
class Entry:
    """One model line of a batch: the ``conf/model`` option, its recipes, targets and extra overrides."""

    model: str
    recipes: tuple[str, ...]
    targets: tuple[str, ...]
    overrides: tuple[str, ...]
    where: str  # FILE:LINE of the entry


@dataclass(frozen=True)
class Batch:
    name: str
    path: Path
    entries: tuple[Entry, ...]
    overrides: tuple[str, ...] = ()
    description: str = ""
    cron: str | None = None
    timezone: str = "UTC"


@dataclass(frozen=True)
class Run:
    """One recipe of one model, at one target: the unit that batches, watches and triggers submit.

    ``overrides`` compose the run's group (every recipe of the same entry and target) without the recipe
    selection; ``compose_overrides`` adds it. ``fingerprint`` is compared between revisions of conf/.
    """

    id: str
    origin: str
    model: str
    recipe: str
    target: str | None
    overrides: tuple[str, ...]
    where: str
    fingerprint: dict[str, Any] = field(compare=False, repr=False)

    def compose_overrides(self, recipes: Iterable[str] | None = None) -> list[str]:
        return [*self.overrides, f"recipe=[{','.join(recipes or [self.recipe])}]"]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "origin": self.origin, "model": self.model, "recipe": self.recipe,
                "target": self.target, "where": self.where, "overrides": self.compose_overrides()}


# -- batch files -------------------------------------------------------------------------------------------
def batch_names(conf_dir: Path) -> list[str]:
    return known_options(conf_dir, BATCH_DIR)


def _shown(path: Path, conf_dir: Path) -> str:
    """A batch file's path as users see it: relative to the project (conf/'s parent)."""
    try:
        return path.relative_to(conf_dir.parent).as_posix()
    except ValueError:
        return str(path)


def load_batch(conf_dir: Path, name: str) -> Batch:
    """Read and check ``conf/batch/NAME.yaml``: unknown keys, models, recipes and targets fail naming FILE:LINE."""
    import yaml

    path = conf_dir / BATCH_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        known = ", ".join(batch_names(conf_dir)) or "none"
        raise ConfigError(f"unknown batch {name!r}; known: {known} (files in {conf_dir / BATCH_DIR})")
    shown = _shown(path, conf_dir)
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise BatchError(f"{shown}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        raise BatchError(f"{shown}:1: empty batch; it needs `models:` (a list of conf/model options)")
    data = _mapping(root, shown, "the batch", _BATCH_KEYS)
    if "models" not in data:
        raise BatchError(f"{shown}:{root.start_mark.line + 1}: batch has no `models:` list")
    recipes = _strings(data.get("recipes"), shown, "recipes")
    targets = _strings(data.get("targets"), shown, "targets")
    overrides = _strings(data.get("overrides"), shown, "overrides")
    models_node = data["models"][1]
    if not isinstance(models_node, yaml.SequenceNode) or not models_node.value:
        raise BatchError(f"{shown}:{models_node.start_mark.line + 1}: `models:` must be a non-empty list")
    entries = []
    for node in models_node.value:
        where = f"{shown}:{node.start_mark.line + 1}"
        if isinstance(node, yaml.ScalarNode):
            entry = Entry(str(node.value), recipes, targets, (), where)
        else:
            fields = _mapping(node, shown, "a models entry", _ENTRY_KEYS)
            if "model" not in fields:
                raise BatchError(f"{where}: models entry has no `model:` (a conf/model option)")
            entry = Entry(str(fields["model"][1].value), _strings(fields.get("recipes"), shown, "recipes") or recipes,
                          _strings(fields.get("targets"), shown, "targets") or targets,
                          _strings(fields.get("overrides"), shown, "overrides"), where)
        _check_names(conf_dir, entry, fields if not isinstance(node, yaml.ScalarNode) else {}, shown, data)
        entries.append(entry)
    cron, timezone = None, "UTC"
    if "watch" in data:
        watch = _mapping(data["watch"][1], shown, "watch", _WATCH_KEYS)
        cron = str(watch["cron"][1].value) if "cron" in watch else None
        timezone = str(watch["timezone"][1].value) if "timezone" in watch else "UTC"
        if cron is not None and len(cron.split()) != 5:
            raise BatchError(f"{shown}:{watch['cron'][1].start_mark.line + 1}: watch.cron {cron!r} is not a 5-field "
                             f"cron expression (e.g. \"0 3 * * *\": daily at 03:00)")
    description = str(data["description"][1].value) if "description" in data else ""
    return Batch(name, path, tuple(entries), overrides, description, cron, timezone)


def _mapping(node, shown: str, what: str, keys: set[str]) -> dict[str, tuple[Any, Any]]:
    """A YAML mapping node's keys -> (key node, value node); unknown keys fail naming their line."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise BatchError(f"{shown}:{node.start_mark.line + 1}: {what} must be a mapping")
    out = {}
    for k, v in node.value:
        if k.value not in keys:
            raise BatchError(f"{shown}:{k.start_mark.line + 1}: unknown key {k.value!r} in {what}; known: "
                             f"{', '.join(sorted(keys))}")
        out[k.value] = (k, v)
    return out


def _strings(item, shown: str, what: str) -> tuple[str, ...]:
    import yaml

    if item is None:
        return ()
    node = item[1]
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "null", "~"):
        return ()
    if not isinstance(node, yaml.SequenceNode) or not all(isinstance(v, yaml.ScalarNode) for v in node.value):
        raise BatchError(f"{shown}:{node.start_mark.line + 1}: `{what}:` must be a list of names")
    return tuple(str(v.value) for v in node.value)


def _check_names(conf_dir: Path, entry: Entry, fields: dict, shown: str, data: dict) -> None:
    """Every model, recipe and target of the entry exists in conf/; the error names the line that says it."""

    def line_of(key: str, value: str) -> str:
        for source in (fields, data):  # the entry's own list first, then the batch's default
            if key in source:
                node = source[key][1]
                items = node.value if isinstance(node.value, list) else [node]
                for item in items:
                    if getattr(item, "value", None) == value:
                        return f"{shown}:{item.start_mark.line + 1}"
        return entry.where

    for group, names in (("model", [entry.model]), ("recipe", entry.recipes), ("target", entry.targets)):
        known = known_options(conf_dir, group)
        for value in names:
            if value not in known:
                from difflib import get_close_matches

                close = get_close_matches(value, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise BatchError(f"{line_of(group + 's' if group != 'model' else 'model', value)}: unknown {group} "
                                 f"{value!r}; {hint}known: {', '.join(known)} (files in {conf_dir / group})")


# -- expansion to runs ---------------------------------------------------------------------------------------
def batch_runs(conf_dir: Path, batch: Batch) -> list[Run]:
    """Every run of a batch: entries × targets (or none) × recipes, each composed once per entry and target."""
    runs = []
    for entry in batch.entries:
        for target in entry.targets or (None,):
            overrides = [*batch.overrides, f"model={entry.model}", *([f"target={target}"] if target else []),
                         *entry.overrides]
            runs += _runs_of(conf_dir, batch.name, overrides, list(entry.recipes), target, entry.where)
    _check_unique(runs)
    return runs


def pipeline_runs(conf_dir: Path) -> list[Run]:
    """The runs of conf/config.yaml as it stands (its model, its default recipes)."""
    return _runs_of(conf_dir, PIPELINE_ORIGIN, [], [], None, _shown(conf_dir / "config.yaml", conf_dir))


def all_runs(conf_dir: Path) -> list[Run]:
    """Every run the repository describes: the default pipeline's, then every batch's."""
    runs = pipeline_runs(conf_dir)
    for name in batch_names(conf_dir):
        runs += batch_runs(conf_dir, load_batch(conf_dir, name))
    return runs


def _runs_of(conf_dir: Path, origin: str, overrides: list[str], recipes: list[str], target: str | None,
             where: str) -> list[Run]:
    composing = [*overrides, *([f"recipe=[{','.join(recipes)}]"] if recipes else [])]
    try:
        cfg = compose(composing, conf_dir=conf_dir)
    except ConfigError as e:
        raise BatchError(f"{where}: {e}") from e
    runs = []
    for name in cfg.recipe:
        run_id = f"{origin}/{cfg.model.name}/{name}" + (f"@{target}" if target else "")
        runs.append(Run(run_id, origin, cfg.model.name, name, target, tuple(overrides), where,
                        fingerprint(cfg, name)))
    return runs


def _check_unique(runs: list[Run]) -> None:
    seen: dict[str, Run] = {}
    for run in runs:
        if run.id in seen:
            raise BatchError(f"{run.where}: run {run.id} is listed twice (also at {seen[run.id].where}); give one "
                             f"entry another model.name in its overrides, or drop it")
        seen[run.id] = run


def fingerprint(cfg: QuantmillConfig, recipe: str) -> dict[str, Any]:
    """The resolved config that decides what one recipe's run makes and publishes (see the module doc)."""
    from quantmill.plan.preflight import effective_gates, resolve_recipe

    data = to_dict(cfg)
    resolved, quantizer = resolve_recipe(recipe, cfg.recipe[recipe])
    out = {"model": data["model"], "recipe": data["recipe"][recipe], "format": resolved.format,
           "validate": {**data["validate"], "gates": effective_gates(cfg, recipe, cfg.recipe[recipe])},
           "publish": data["publish"], "store": data["store"], "target": data["target"]}
    if resolved.format in ("gguf", "mlx"):
        out["convert"] = {k: v for k, v in data["convert"].items() if k.startswith(resolved.format)}
    if quantizer.needs_calibration(resolved):
        out["calibration"] = data["calibration"]
    return out


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two fingerprints differ, e.g. ``recipe.gates.max_ppl_ratio: 1.1 -> 1.05``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: added {new[key]!r}")
            elif key not in new:
                out.append(f"{where}: removed")
            else:
                out += changed_paths(old[key], new[key], where)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def groups(runs: Iterable[Run]) -> list[tuple[list[str], list[Run]]]:
    """Runs that differ only in their recipe, together: one pipeline each (shared download, calibration, F16)."""
    out: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        out.setdefault(run.overrides, []).append(run)
    return [(list(key), members) for key, members in out.items()]


def replace_overrides(run: Run, extra: Iterable[str]) -> Run:
    return dataclasses.replace(run, overrides=(*run.overrides, *extra))
