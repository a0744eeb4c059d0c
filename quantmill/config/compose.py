"""Composition: ``conf/`` and Hydra override strings into one validated ``QuantmillConfig``, Hydra's multi-line
errors turned into one line (the thing, the value, the fix), and the config's plain-dict form for flows."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf

from quantmill import constants as C
from quantmill.config.schema import (
    GROUP_SCHEMAS,
    GateConfig,
    PoolConfig,
    QuantmillConfig,
    RecipeConfig,
    RequiresConfig,
    SensitivityConfig,
    register_schemas,
)
from quantmill.errors import ConfigError


def find_conf_dir(explicit: str | Path | None = None) -> Path:
    """The conf/ directory: explicit argument, $QUANTMILL_CONF, ./conf, or the one beside this package."""
    candidates = [explicit, os.environ.get(C.ENV_CONF_DIR), Path.cwd() / "conf",
                  Path(__file__).resolve().parents[2] / "conf"]
    for c in candidates:
        if c and (Path(c) / "config.yaml").is_file():
            return Path(c).resolve()
    raise ConfigError(f"no conf/config.yaml found (looked in: {', '.join(str(c) for c in candidates if c)}); "
                      f"run from a quantmill project or set {C.ENV_CONF_DIR}")


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The key or config group each override sets, as Hydra reads it (``+model.path=x`` sets ``model.path``,
    ``~recipe`` ``recipe``); none where an override cannot be read, which composing then reports with its fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
    except HydraException:
        return []


def known_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


_HYDRA_MISSING = re.compile(r"Could not (?:find|load) '([\w/]+)/([^']+)'")
_HYDRA_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_NOT_IN = re.compile(r"Key '([^']+)' not in '(\w+)'")


_AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^=']+)=([^']*)'")


def _explain(exc: Exception, conf_dir: Path, overrides: Sequence[str] = ()) -> ConfigError:
    """Turn Hydra/OmegaConf's multi-line errors into one line naming the thing, the value and the fix."""
    text = str(exc)
    if m := _AMBIGUOUS.search(text):
        key, value = m.group(1), m.group(2)
        return ConfigError(f"override {key}={value} gives several values; for a list write '{key}=[{value}]', for "
                           f"one run per value use `quantmill run -m {key}={value}`")
    if "mismatched input" in text or "extraneous input" in text:
        braced = [o for o in overrides if ("{" in o or "}" in o) and "='" not in o and '="' not in o]
        if braced:
            key, _, value = braced[0].partition("=")
            return ConfigError(f"override {braced[0]!r} cannot be read: Hydra takes {{...}} as a dict; quote the "
                               f"value for Hydra inside the shell's quotes: \"{key}='{value}'\"")
        first = text.splitlines()[0].strip()
        return ConfigError(f"an override cannot be read ({first}); see Hydra's override grammar, and quote values "
                           f"with spaces or special characters: \"key='value'\"")
    if m := _HYDRA_MISSING.search(text):
        group, name = m.group(1), m.group(2)
        options = known_options(conf_dir, group)
        return ConfigError(f"unknown {group} {name!r}{_did_you_mean(name, options)}; known: {', '.join(options)} "
                           f"(files in {conf_dir / group})")
    if m := _NOT_IN.search(text):
        key, schema = m.group(1), m.group(2)
        full = getattr(exc, "full_key", None) or key
        fields = _schema_fields(schema)
        hint = f"; {schema} has: {', '.join(fields)}" if fields else ""
        return ConfigError(f"unknown config key {full!r}{_did_you_mean(full.rpartition('.')[2], fields)}{hint}")
    if m := _HYDRA_OVERRIDE.search(text):
        key = m.group(1)
        group, _, leaf = key.rpartition(".")
        close = _did_you_mean(leaf, _fields_at(group))
        return ConfigError(f"unknown config key {key!r}{close}; {group or 'the root config'} has no {leaf!r} "
                           f"(check the spelling, or see conf/{group.split('.')[0]}/)")
    cause = exc.__cause__ or exc
    first = str(cause).splitlines()[0].strip()
    where = getattr(cause, "full_key", None)
    return ConfigError(f"invalid config{f' at {where!r}' if where else ''}: {first}")


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6) or [
        c for c in choices if c.startswith(word)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(path: str) -> list[str]:
    """The keys a dotted config path takes (``validate``: ValidateConfig's fields; ``recipe.X.gates``: a gate's)."""
    import dataclasses

    parts = [p for p in path.split(".") if p]
    if not parts:
        return [f.name for f in dataclasses.fields(QuantmillConfig)]
    if parts[0] == "recipe":
        schema = {1: None, 2: RecipeConfig}.get(len(parts)) or {"gates": GateConfig, "requires": RequiresConfig}.get(
            parts[-1])
    elif parts == ["calibration", "sensitivity"]:
        schema = SensitivityConfig
    else:
        schema = GROUP_SCHEMAS.get(parts[0]) if len(parts) == 1 else None
    return [f.name for f in dataclasses.fields(schema)] if schema else []


def _schema_fields(name: str) -> list[str]:
    import dataclasses

    schema = {cls.__name__: cls for cls in (*GROUP_SCHEMAS.values(), RecipeConfig, RequiresConfig, GateConfig, PoolConfig,
                                            SensitivityConfig, QuantmillConfig)}.get(name)
    return [f.name for f in dataclasses.fields(schema)] if schema else []


def compose(overrides: Sequence[str] = (), conf_dir: str | Path | None = None) -> QuantmillConfig:
    """Compose ``conf/`` with Hydra override strings into a validated ``QuantmillConfig``.

    Raises:
        ConfigError: unknown group option, unknown key, wrong type or missing value; one line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    directory = find_conf_dir(conf_dir)
    register_schemas()
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
            target = cfg.target
            if target.name != "none" and "recipe" not in override_keys(overrides):
                # The target's decision table picks the recipes (those this build has); the planner then drops
                # the ones whose estimated footprint exceeds the target.
                available = [r for r in target.recipes if (directory / "recipe" / f"{r}.yaml").is_file()]
                if not available:
                    raise ConfigError(f"target {target.name!r} recommends {', '.join(target.recipes)}, none of which "
                                      f"has a recipe file in {directory / 'recipe'}")
                cfg = hydra_compose(config_name="config", overrides=[*overrides, f"recipe=[{','.join(available)}]"])
        return to_config(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise _explain(e, directory, overrides) from e


def to_config(cfg: Any) -> QuantmillConfig:
    """A DictConfig (or plain dict) to the typed config, failing on missing values; also the inverse of to_dict."""
    from omegaconf.errors import MissingMandatoryValue

    _check_keys(OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg,
                QuantmillConfig, "")
    node = OmegaConf.merge(OmegaConf.structured(QuantmillConfig), cfg)
    try:
        obj = OmegaConf.to_object(node)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required config value {e.full_key!r}; set it in conf/ or as an "
                          f"override ({e.full_key}=...)") from e
    if not obj.recipe:
        raise ConfigError("no recipes selected; choose some, e.g. recipe=[gguf_q8_0,gguf_q4_k_m]")
    _check_values(obj, "")
    return obj


def _check_values(node: Any, path: str) -> None:
    """Every bounded field's value (``schema.bounded``): one line naming the key, the value and what it takes."""
    import dataclasses

    for f in dataclasses.fields(node):
        value, where = getattr(node, f.name), f"{path}{f.name}"
        least, choices = f.metadata.get("least"), f.metadata.get("choices")
        if least is not None and value is not None and value < least:
            raise ConfigError(f"{where} {value!r} is out of range; set {where}={least:g} or more")
        if choices and value not in choices:
            raise ConfigError(f"{where} {value!r} is not one of {', '.join(choices)}; set {where}={choices[0]}")
        if dataclasses.is_dataclass(value):
            _check_values(value, f"{where}.")


def _check_keys(node: Any, schema: type, path: str) -> None:
    """Refuse keys a schema does not declare, wherever they came from (Hydra's ``+key=`` opens structs)."""
    import dataclasses
    import typing

    if not isinstance(node, dict):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in node.items():
        if key == "hydra" and not path:
            continue
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(f"unknown config key {where!r}; {schema.__name__} has: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _check_keys(value, hint, where)
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            for name, item in (value or {}).items():
                _check_keys(item, typing.get_args(hint)[1], f"{where}.{name}")


def absolute_paths(cfg: QuantmillConfig, base: Path | None = None) -> QuantmillConfig:
    """The config with its relative paths made absolute against ``base`` (default: the working directory), for a
    run that another process executes in another directory (a worker of the pipeline pool)."""
    import dataclasses

    base = Path(base or Path.cwd())

    def absolute(value: Optional[str]) -> Optional[str]:
        return value if not value or Path(value).expanduser().is_absolute() else str((base / value).resolve())

    def texts(names: List[str]) -> List[str]:
        return [n if n.startswith("bundled:") else absolute(n) for n in names]

    model = cfg.model
    if model.source == "local":
        model = dataclasses.replace(model, path=absolute(model.path))
    if model.adapter and (base / model.adapter).exists():
        model = dataclasses.replace(model, adapter=absolute(model.adapter))
    return dataclasses.replace(
        cfg, model=model,
        store=dataclasses.replace(cfg.store, root=absolute(cfg.store.root), cache_dir=absolute(cfg.store.cache_dir)),
        infra=dataclasses.replace(cfg.infra, prefect_home=absolute(cfg.infra.prefect_home)),
        calibration=dataclasses.replace(cfg.calibration, files=texts(list(cfg.calibration.files))),
        validate=dataclasses.replace(cfg.validate, eval_files=texts(list(cfg.validate.eval_files))))


def to_dict(cfg: QuantmillConfig) -> dict[str, Any]:
    """Plain JSON-able dict (what a flow takes as its parameter). The config is typed and resolved already, so
    ``dataclasses.asdict`` gives what OmegaConf would, 100x faster."""
    import dataclasses

    return dataclasses.asdict(cfg)
