"""Preflight: every check that can run before heavy work, once, with one line per problem (the thing, the value,
the fix). Reads only model metadata (config.json, the file list, headers), never weights.

``preflight(cfg, store)`` returns what the checks resolved (``Checked``): the recipes with their backends, the
runtimes and gates, the publisher, the source's description. ``quantmill.plan.build`` turns that into the DAG.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.backends import CONVERTERS, PUBLISHERS, QUANTIZERS, RUNTIMES, SOURCES
from quantmill.backends.base import SourceInfo
from quantmill.config import QuantmillConfig
from quantmill.constants import FLIP_PROMPT_TOKENS
from quantmill.errors import ConfigError, PreflightError
from quantmill.plan.targets import apply_target
from quantmill.plan.texts import BUNDLED_TEXT, check_tasks, text_files  # noqa: F401 (BUNDLED_TEXT re-exported)
from quantmill.registry.names import check_name
from quantmill.store import signing
from quantmill.store.local import Store


@dataclass
class Checked:
    """A config that passed preflight, with what the checks resolved along the way.

    Attributes:
        cfg: The config, less the recipes a target cannot hold.
        warnings: One line per recipe the target dropped.
        recipes: recipe name -> (recipe with its format filled in, quantizer, converter).
        info: The model source's description (metadata only).
        adapter_info: The LoRA adapter's description, if ``model.adapter`` is set.
        publisher, signer: The publisher (None when publishing is off) and the signing key, if any.
        names: recipe name -> the registry name it publishes under.
        runtimes, gates: recipe name -> its validation runtime and effective gates (validation on).
        eval_files: The evaluation texts (validation on).
        domain_files: Each further domain's evaluation texts (``validate.domains``).
        task_files: The lm-eval task files and their data files (``validate.tasks``).
        calibration_files: The calibration texts (a recipe reads the calibration set from files).
    """

    cfg: QuantmillConfig
    warnings: list[str]
    recipes: dict[str, tuple[Any, Any, Any]]
    info: SourceInfo
    adapter_info: SourceInfo | None = None
    publisher: Any = None
    signer: Any = None
    names: dict[str, str] = field(default_factory=dict)
    runtimes: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_files: list[Path] = field(default_factory=list)
    calibration_files: list[Path] = field(default_factory=list)
    domain_files: dict[str, list[Path]] = field(default_factory=dict)
    task_files: list[Path] = field(default_factory=list)


def preflight(cfg: QuantmillConfig, store: Store) -> Checked:
    """Every check of ``cfg`` against the backends, this machine, the store and the model's metadata.

    Raises:
        ConfigError / PreflightError / ModelSourceError: one line naming the problem and the fix.
    """
    # Ranges and choices of single values were checked while composing (config.schema.bounded).
    cfg = expand_ladders(cfg)
    cfg, warnings = apply_target(cfg, store)
    model = cfg.model
    source = SOURCES.get(model.source)
    # Backend and recipe checks first: they need nothing from the model, so a typo fails before any download.
    recipes = {}
    for name, recipe in cfg.recipe.items():
        recipe, quantizer = resolve_recipe(name, recipe)
        quantizer.check(name, recipe)
        if getattr(quantizer, "uses_sensitivity", False):
            from quantmill.backends.gguf_auto_quantizer import check_types

            check_types(list(cfg.calibration.sensitivity.types))
        recipes[name] = (recipe, quantizer, CONVERTERS.get(recipe.format))
    if cfg.infra.mode == "embedded":
        from quantmill.toolchain.hardware import check_here

        for name, (recipe, _, _) in recipes.items():
            check_here(name, recipe.requires)
    publisher = PUBLISHERS.get(cfg.publish.publisher) if cfg.publish.enabled else None
    signer = None
    if publisher is not None:
        publisher.check(cfg.publish, store)
        signer = signing.signer_from(cfg.publish.signing_key)  # a bad key path fails here, before any work
    if publisher is not None and not cfg.validate.enabled and cfg.validate.enforce:
        raise PreflightError("publishing needs a passed validation but validate.enabled=false; enable it, or set "
                             "validate.enforce=false to publish marked unvalidated, or publish.enabled=false")
    names = {r: check_name(cfg.publish.name_template.format(model=model.name, recipe=r)) for r in recipes}
    runtimes, gates, eval_files, domain_files, task_files = {}, {}, [], {}, []
    if cfg.validate.enabled:
        for name, (recipe, _, _) in recipes.items():
            runtimes[name] = runtime_for(recipe.format)
            if cfg.infra.mode == "embedded":  # with pools, `quantmill worker` checks what its pool offers
                runtimes[name].check_installed()
            gates[name] = effective_gates(cfg, name, recipe)
        eval_files = text_files(list(cfg.validate.eval_files), "validate.eval_files")
        domain_files = check_domains(cfg, gates)
        task_files = check_tasks(list(cfg.validate.tasks), gates)
    needs_calibration = any(q.needs_calibration(r) for r, q, _ in recipes.values())
    cal_files = calibration_files(cfg) if needs_calibration else []

    cache = store.digest_cache()
    adapter_info = None
    if model.adapter:  # before the base: a wrong adapter is refused before anything is fetched
        from quantmill.plan import lora

        adapter_info = lora.describe(model, cache)
        lora.check_base(model, adapter_info)
    info = source.describe(model, cache)
    for name, (recipe, quantizer, converter) in recipes.items():
        converter.check(info, model.name)
        quantizer.check_model(name, recipe, info)
        if getattr(quantizer, "uses_sensitivity", False):
            recipe = _resolve_budget(cfg, name, recipe, info)
            recipes[name] = (recipe, quantizer, converter)
    if cfg.validate.enabled:
        _check_context(cfg, info, eval_files)
        for domain, files in domain_files.items():
            _check_context(cfg, info, files, f"domain {domain!r}")
        if any(g.get("tokenizer_exact") for g in gates.values()):
            _check_tokenizer_agrees(cfg, info, store)
    return Checked(cfg, warnings, recipes, info, adapter_info, publisher, signer, names, runtimes, gates, eval_files,
                   cal_files, domain_files, task_files)


def calibration_files(cfg: QuantmillConfig) -> list[Path]:
    """The calibration text files, resolved."""
    if cfg.calibration.source != "files":
        return []
    return text_files(list(cfg.calibration.files), "calibration.files")


def effective_gates(cfg: QuantmillConfig, name: str, recipe) -> dict[str, Any]:
    """validate.gates overridden field by field by the recipe's gates."""
    from quantmill.config import GateConfig

    known = [f.name for f in dataclasses.fields(GateConfig)]
    unknown = sorted(set(recipe.gates) - set(known))
    if unknown:
        raise ConfigError(f"recipe {name!r}: unknown gate(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return {**dataclasses.asdict(cfg.validate.gates), **dict(recipe.gates)}


def runtime_for(fmt: str):
    for key in RUNTIMES:
        runtime = RUNTIMES.get(key)
        if fmt in runtime.formats:
            return runtime
    raise PreflightError(f"no validation runtime for format {fmt!r}; known runtimes: {', '.join(RUNTIMES)}")


def expand_ladders(cfg: QuantmillConfig) -> QuantmillConfig:
    """A recipe whose budget (``params.budget_bpw``, ``budget_gib`` or ``budget_target``) is a list becomes one
    recipe per budget, ``<name>-<budget>``: a ladder made in one run from one sensitivity measurement."""
    recipes: dict[str, Any] = {}
    for name, recipe in cfg.recipe.items():
        key = next((k for k in ("budget_bpw", "budget_gib", "budget_target")
                    if isinstance(recipe.params.get(k), (list, tuple))), None)
        if key is None:
            recipes[name] = recipe
            continue
        budgets = recipe.params[key]
        if not budgets:
            raise ConfigError(f"recipe {name!r}: params.{key} is an empty list; give one or more budgets, e.g. "
                              f"[3.9, 4.9]")
        for budget in budgets:
            number = isinstance(budget, (int, float)) and not isinstance(budget, bool)
            if key != "budget_target" and not number:
                raise ConfigError(f"recipe {name!r}: params.{key} has {budget!r}, not a number; e.g. [3.9, 4.9]")
            suffix = {"budget_bpw": "", "budget_gib": "gib"}.get(key, "")
            label = f"{budget:g}{suffix}" if number else str(budget)
            recipes[f"{name}-{label}"] = dataclasses.replace(recipe, params={**recipe.params, key: budget})
    return cfg if recipes.keys() == cfg.recipe.keys() else dataclasses.replace(cfg, recipe=recipes)


def _resolve_budget(cfg: QuantmillConfig, name: str, recipe: Any, info: SourceInfo) -> Any:
    """The recipe with its budget as bits per weight (a file size or a target's memory converted with the model's
    shape), refused when below every tensor at the smallest candidate type."""
    import math

    from quantmill.backends.gguf_auto_quantizer import bpw_of_bytes, elements, feasible_bpw, type_bits

    params = dict(recipe.params)
    try:
        if "budget_target" in params:
            params.update(_target_budget(name, params.pop("budget_target"), info))
        if "budget_gib" in params:
            params.setdefault("budget_from", f"{params['budget_gib']:.4g} GiB file")
        least = feasible_bpw(info.config, list(cfg.calibration.sensitivity.types))
        budget = (bpw_of_bytes(info.config, params["budget_gib"] * 2**30) if "budget_gib" in params
                  else float(params["budget_bpw"]))
    except KeyError:  # not a shape this estimate reads: the quantize step checks exactly
        return recipe
    types = list(cfg.calibration.sensitivity.types)
    if budget < least:
        floor = math.ceil(least * 100) / 100
        asked = (f"budget {params['budget_from']} ({budget:.3g} bits per weight)" if "budget_from" in params
                 else f"budget_bpw {budget:g}")
        least_gib = floor * sum(elements(info.config)) / 8 / 2**30
        raise PreflightError(f"recipe {name!r}: {asked} is below the smallest mix of the candidate types for model "
                             f"{cfg.model.name!r} (about {floor:.2f} bits per weight, every tensor at "
                             f"{min(types, key=type_bits).upper()}); raise budget_bpw to at least {floor:.2f} "
                             f"(a {least_gib:.3g} GiB file) or add a smaller type to calibration.sensitivity.types")
    return dataclasses.replace(recipe, params=params)


def _target_budget(name: str, target_name: Any, info: SourceInfo) -> dict[str, Any]:
    """The largest file a conf/target profile holds beside its KV cache and runtime overhead, as bits per weight."""
    from quantmill.config import compose
    from quantmill.estimate import Shape

    target = compose([f"target={target_name}", "recipe=[gguf_q8_0]"]).target
    room = (target.memory_gb - target.overhead_gb) * 2**30 - Shape.from_config(info.config).kv_cache_bytes(
        target.context)
    if room <= 0:
        raise PreflightError(f"recipe {name!r}: target {target_name} ({target.memory_gb:g} GiB) has no room for "
                             f"weights beside {target.context} tokens of KV cache; lower target.context or choose "
                             f"another target")
    return {"budget_gib": float(f"{room / 2**30:.6g}"),
            "budget_from": f"target {target_name}, {target.context} tokens of context"}


def resolve_recipe(name: str, recipe):
    """The recipe's quantizer backend (``backend``, else the method's own) and its format filled in."""
    quantizer = QUANTIZERS.get(recipe.backend or recipe.method)
    fmt = recipe.format or quantizer.default_format(recipe)
    if fmt not in quantizer.formats:
        raise PreflightError(f"recipe {name!r}: backend {quantizer.key!r} cannot produce format {fmt!r} (it makes: "
                             f"{', '.join(quantizer.formats)}); drop recipe.{name}.format or choose one of those")
    return dataclasses.replace(recipe, format=fmt), quantizer


def check_domains(cfg: QuantmillConfig, gates: dict[str, dict[str, Any]]) -> dict[str, list[Path]]:
    """``validate.domains``: each one known, its texts there, its gates known; domain -> its text files."""
    from quantmill.config import GateConfig

    v = cfg.validate
    known_gates = [f.name for f in dataclasses.fields(GateConfig)]
    files = {}
    for domain in v.domains:
        if domain not in v.domain_texts:
            known = ", ".join(sorted(v.domain_texts)) or "none"
            raise ConfigError(f"validate.domains names {domain!r}, which validate.domain_texts does not define; "
                              f"known: {known} (add validate.domain_texts.{domain}=[FILE])")
        files[domain] = text_files(list(v.domain_texts[domain]), f"validate.domain_texts.{domain}")
    for domain, overrides in v.domain_gates.items():
        if domain not in v.domains:
            raise ConfigError(f"validate.domain_gates has gates for {domain!r}, which is not in validate.domains "
                              f"({', '.join(v.domains) or 'none'}); add it there or drop its gates")
        unknown = sorted(set(overrides) - set(known_gates))
        if unknown:
            raise ConfigError(f"validate.domain_gates.{domain}: unknown gate(s) {', '.join(unknown)}; known: "
                              f"{', '.join(known_gates)}")
    return files


def domain_gates(cfg: QuantmillConfig, recipe_gates: dict[str, Any], domain: str) -> dict[str, Any]:
    """A recipe's gates for one domain: its own, overridden by ``validate.domain_gates.<domain>``."""
    return {**recipe_gates, **dict(cfg.validate.domain_gates.get(domain, {}))}


def _check_context(cfg: QuantmillConfig, info: SourceInfo, eval_files: list[Path], what: str = "") -> None:
    """The evaluation window must fit the model, and the text must fill at least one window."""
    n_ctx = cfg.validate.n_ctx
    limit = info.config.get("max_position_embeddings")
    if limit and n_ctx > limit:
        raise PreflightError(f"validate.n_ctx {n_ctx} is beyond model {cfg.model.name!r}'s maximum context {limit} "
                             f"(max_position_embeddings); lower validate.n_ctx")
    root = Path(info.extra.get("root", ""))
    conversations = [p.name for p in eval_files if p.suffix == ".jsonl"]
    v = cfg.validate
    if v.flip_prompts and FLIP_PROMPT_TOKENS + v.flip_tokens > n_ctx:
        raise PreflightError(f"validate.flip_tokens {v.flip_tokens} after a {FLIP_PROMPT_TOKENS}-token opening do "
                             f"not fit one window of validate.n_ctx={n_ctx}; lower validate.flip_tokens to at most "
                             f"{n_ctx - FLIP_PROMPT_TOKENS} or raise validate.n_ctx")
    if v.max_tokens >= n_ctx:
        raise PreflightError(f"validate.max_tokens {v.max_tokens} does not fit one window of validate.n_ctx={n_ctx} "
                             f"with the prompt; lower validate.max_tokens or raise validate.n_ctx")
    if (root / "tokenizer.json").is_file():
        from quantmill.toolchain.source_tokenizer import SourceTokenizer

        tok = SourceTokenizer(root)
        prompt = len(tok.encode(v.prompt)) + 1  # and BOS
        curve = max(32, v.offload_tokens or v.max_tokens) if v.offload_curve else 0
        for name, tokens in (("max_tokens", v.max_tokens), ("offload_tokens", curve)):
            if not what and prompt + tokens > n_ctx:
                raise PreflightError(f"validate.{name} {tokens} after the prompt's {prompt} tokens do not fit one "
                                     f"window of validate.n_ctx={n_ctx}; lower validate.{name} to at most "
                                     f"{n_ctx - prompt} or raise validate.n_ctx")
        if conversations and not tok.chat_template:
            raise PreflightError(f"{what or 'the evaluation'} renders conversations ({', '.join(conversations)}) "
                                 f"through the model's chat template, and model {cfg.model.name!r} has none; drop "
                                 f"it from validate.domains or give plain text")
        n = len(tok.encode(tok.text_of(eval_files)))
        if n < n_ctx:
            raise PreflightError(f"{what + ' ' if what else ''}evaluation text ({', '.join(p.name for p in eval_files)})"
                                 f" has {n} tokens, shorter than one window of validate.n_ctx={n_ctx}; add text or "
                                 f"lower validate.n_ctx")




def _check_tokenizer_agrees(cfg: QuantmillConfig, info: SourceInfo, store: Store) -> None:
    """A source whose tokenizer disagrees with itself is the source's problem: say so once, before any artifact
    fails the tokenizer gate for it. The verdict is kept per tokenizer content (loading transformers costs seconds)."""
    import hashlib
    import json

    from quantmill.toolchain.source_tokenizer import disagreement
    from quantmill.toolchain.versions import package_versions

    root = Path(info.extra.get("root", ""))
    names = sorted(p.name for p in root.glob("tokenizer*") if p.is_file()) if info.extra.get("root") else []
    if "tokenizer.json" not in names:
        return
    h = hashlib.sha256(json.dumps([package_versions("transformers", "tokenizers"), list(cfg.validate.probes)])
                       .encode())
    for name in names:
        h.update(name.encode() + (root / name).read_bytes())
    memo = store.state_dir() / "tokenizer-checks.json"
    try:
        verdicts = json.loads(memo.read_text())
    except (OSError, ValueError):
        verdicts = {}
    key = h.hexdigest()
    if key not in verdicts:
        verdicts[key] = disagreement(root, list(cfg.validate.probes))
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(verdicts))
        os.replace(tmp, memo)
    if verdicts[key]:
        raise PreflightError(f"model {cfg.model.name!r}: its tokenizer disagrees with itself ({verdicts[key]}), so "
                             f"no artifact could pass the tokenizer gate; fix the source's tokenizer files "
                             f"(tokenizer_class in tokenizer_config.json) or set validate.gates.tokenizer_exact=false")
