"""``quantmill recommend``: which published artifact of a model to run on a target, or, for a model named by its
config with nothing published yet, which recipe to build."""

from __future__ import annotations

import argparse
import json
import sys

from quantmill.cli.common import team_registry


def _recommend_to_build(args: argparse.Namespace) -> int:
    from quantmill.cli import ui
    from quantmill.config import compose as compose_config
    from quantmill.plan.preflight import resolve_recipe
    from quantmill.plan.targets import target_fit
    from quantmill.registry import recommend

    cfg = compose_config([*args.overrides, f"target={args.target}"], conf_dir=args.config_dir)
    kinds = {name: (resolve_recipe(name, r)[0].format, r.quant_type) for name, r in cfg.recipe.items()}
    why, rows = recommend.to_build(target_fit(cfg), cfg.target, args.model, kinds)
    if args.json:
        print(json.dumps({"recommendation": why, "estimate": True, "rows": rows}, indent=1))
    else:
        ui.out.print(ui.recommend_table(rows, title="recipes to build, in the target's order of preference; "
                                                    "footprints estimated from the model's config"))
        print(why)
    return 0 if any(r["rank"] for r in rows) else 1


def cmd_recommend(args: argparse.Namespace) -> int:
    from quantmill.cli import ui
    from quantmill.config import compose as compose_config
    from quantmill.config import override_keys
    from quantmill.errors import ConfigError
    from quantmill.plan.preflight import resolve_recipe
    from quantmill.registry import recommend

    target = compose_config([f"target={args.target}", "recipe=[gguf_q8_0]"], conf_dir=args.config_dir).target
    if target.name == "none" or not target.memory_gb:
        raise ConfigError(f"target {args.target!r} has no memory_gb to fit artifacts in; name a profile from "
                          f"conf/target (quantmill targets lists them)")
    recipes = compose_config([f"recipe=[{','.join(target.recipes)}]"], conf_dir=args.config_dir).recipe
    formats = {resolve_recipe(name, r)[0].format for name, r in recipes.items()}
    # A model named by its config (model=hf model.repo_id=..., model=local model.path=...) that has nothing
    # published yet gets the recipe to build, from estimates; a bare name must be in the registry.
    configured = any(k.split(".")[0] == "model" for k in override_keys(args.overrides))
    if configured:
        args.overrides = [*args.overrides, f"model.name={args.model}"]
    try:
        _, registry = team_registry(args)
        entries = [e for e in registry.entries() if e["model"] == args.model]
    except ConfigError as e:
        if not configured:
            raise
        print(f"quantmill: the registry was not read ({e}); answering from estimates", file=sys.stderr)
        entries = []
    if not entries and configured:
        return _recommend_to_build(args)
    choices = recommend.rank(entries, target, formats, args.domain)
    why = recommend.explain(choices, target, args.model, args.domain)
    if args.json:
        print(json.dumps({"recommendation": why, "rows": recommend.rows(choices)}, indent=1))
    else:
        ui.out.print(ui.recommend_table(recommend.rows(choices)))
        print(why)
    return 0 if any(c.usable for c in choices) else 1
