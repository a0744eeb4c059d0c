"""``quantmill quantize MODEL RECIPE... --out DIR``: one model to named files in one command; ``quantmill recipes``
and ``quantmill targets``: what there is to choose from.

MODEL is a model folder, a bundled model's name or a Hub repo id. Words with ``=`` are Hydra overrides, the others
recipe names. The whole pipeline runs with the defaults (download, calibrate, convert, quantize, validate, publish
to the local registry); then each artifact that passed is placed in DIR.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from quantmill.cli.common import add_command

QUANTIZE_EXAMPLES = """examples:
  quantmill quantize tiny-llama gguf_q4_k_m --out quants           the bundled model
  quantmill quantize /models/my-llama gguf_q4_k_m mlx_4bit --out quants
  quantmill quantize Qwen/Qwen2.5-0.5B-Instruct gguf_q8_0 --out quants
  quantmill quantize /models/my-llama gguf_q4_k_m validate.n_chunks=4   any setting of conf/ may follow
  quantmill recipes                                                 what each recipe makes and needs
"""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def configure_parser(sub) -> dict[str, argparse.ArgumentParser]:
    p = add_command(sub, "quantize", cmd_quantize, "quantize one model into named files: MODEL RECIPE... --out DIR",
                    overrides=False, examples=QUANTIZE_EXAMPLES)
    p.add_argument("model", help="a model folder, a bundled model's name or a Hugging Face repo id (org/name)")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE",
                   help="recipes (default: conf/config.yaml's), then any Hydra overrides")
    p.add_argument("--out", default=".", metavar="DIR", help="where the files go (default: the current folder)")
    p.add_argument("--name", help="the model's name in file names (default: the folder's or repo's name)")
    p.add_argument("--force", action="store_true", help="also write artifacts that fail a gate, marked unvalidated")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    r = add_command(sub, "recipes", cmd_recipes, "list the recipes: what each makes, what it needs",
                    overrides=False, examples="examples:\n  quantmill recipes\n  quantmill recipes --json\n")
    r.add_argument("--json", action="store_true")
    t = add_command(sub, "targets", cmd_targets, "list the hardware targets and the recipes each picks",
                    overrides=False, examples="examples:\n  quantmill targets\n  quantmill run target=rtx4090_24gb "
                    "model=local model.path=/models/llama\n")
    t.add_argument("--json", action="store_true")
    return {"quantize": p, "recipes": r, "targets": t}


def model_overrides(model: str, name: str | None) -> list[str]:
    """Hydra overrides that select ``model``: a folder, a bundled model, or a Hub repo id."""
    from quantmill.errors import ConfigError

    path = Path(model).expanduser()
    if path.is_dir():
        return ["model=local", f"model.path={path.resolve()}", f"model.name={name or path.resolve().name}"]
    from quantmill.backends.local_source import BUNDLED_ROOT

    if (BUNDLED_ROOT / model / "config.json").is_file():
        return [f"model.path={model}", f"model.name={name or model}"]
    if _REPO_ID.match(model):
        return ["model=hf", f"model.repo_id={model}", f"model.name={name or model.split('/')[1]}"]
    bundled = sorted(p.parent.name for p in BUNDLED_ROOT.glob("*/config.json"))
    raise ConfigError(f"model {model!r} is not a folder, a bundled model ({', '.join(bundled)}) or a Hub repo id "
                      f"(org/name); give one of those")


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    recipes = [i for i in items if "=" not in i]
    return recipes, [i for i in items if "=" in i]


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantmill import progress
    from quantmill.cli import ui
    from quantmill.config import compose
    from quantmill.errors import ConfigError
    from quantmill.plan.preflight import resolve_recipe
    from quantmill.prefect.launch import run_config
    from quantmill.registry.export import export
    from quantmill.steps.publish import with_domains
    from quantmill.steps.validate import failed_checks
    from quantmill.store import open_store

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():  # found before the pipeline runs, not when its files are placed
        raise ConfigError(f"--out {args.out!r} is a file; give a folder (it is created if missing)")
    recipes, overrides = _split(args.items)
    chosen = [f"recipe=[{','.join(recipes)}]"] if recipes else []
    force = ["validate.enforce=false"] if args.force else []
    cfg = compose([*model_overrides(args.model, args.name), *chosen, *force, *overrides], conf_dir=args.config_dir)
    start = time.perf_counter()
    with progress.using(ui.RichReporter()):
        outcomes = run_config(cfg, verbose=args.verbose)
    elapsed = time.perf_counter() - start
    by_id = {o.spec_id: o for o in outcomes}
    store = open_store(cfg.store)
    written, problems = [], []
    for recipe_name, recipe in cfg.recipe.items():
        quantized, validated = by_id.get(f"quantize:{recipe_name}"), by_id.get(f"validate:{recipe_name}")
        published = by_id.get(f"publish:{recipe_name}")
        if quantized is None or not quantized.ok:
            problems.append(f"{recipe_name}: {_first_error(outcomes, recipe_name)}")
            continue
        if validated is not None and validated.error:  # the validation step itself failed
            problems.append(f"{recipe_name}: {validated.error}")
            continue
        domains = {o.spec_id.partition("@")[2]: o for o in outcomes if o.spec_id.startswith(f"validate:{recipe_name}@")}
        if any(o.error for o in domains.values()):
            problems.append(f"{recipe_name}: " + "; ".join(f"{d}: {o.error}" for d, o in domains.items() if o.error))
            continue
        validation = with_domains(_validation_record(store, validated),
                                  {d: _validation_record(store, o) for d, o in domains.items()})
        if validation and validation.get("status") != "passed" and not args.force:
            problems.append(f"{recipe_name}: failed validation: {'; '.join(failed_checks(validation))}; not written "
                            f"(--force writes it marked unvalidated)")
            continue
        card = None
        if published is not None and published.ok:
            card = store.read_file(_ref(published), "README.md").decode()
        fmt = resolve_recipe(recipe_name, recipe)[0].format
        written.append(export(store, _ref(quantized), out, model=cfg.model.name, recipe=recipe_name, fmt=fmt,
                              validation=validation, card=card))
    if args.json:
        print(json.dumps({"written": [w.to_json() for w in written], "problems": problems}, indent=1))
    else:
        ui.out.print(ui.summary_table(outcomes, elapsed))
        ui.out.print(ui.written_table(written))
        if written:
            ui.out.print("run it:", highlight=False)
        for w in written:
            for command in w.run:
                ui.out.print(f"  {command}", highlight=False, soft_wrap=True)
    for line in problems:
        print(f"quantmill: error: {line}", file=sys.stderr)
    return 0 if written and not problems else 1


def _ref(outcome):
    from quantmill.store.local import ArtifactRef

    return ArtifactRef(outcome.key, outcome.digest, "")


def _validation_record(store, validated) -> dict[str, Any] | None:
    """The whole validation record (checks with their margins), not only the step's summary."""
    from quantmill import constants as C

    if validated is None or not validated.key:
        return None
    return json.loads(store.read_file(_ref(validated), C.VALIDATION_FILE))


def _first_error(outcomes, recipe: str) -> str:
    for o in outcomes:
        if o.error and (o.recipe in (recipe, None)):
            return f"{o.spec_id}: {o.error}"
    return "not quantized"


def recipe_rows(conf_dir: str | None) -> list[dict[str, Any]]:
    """Every recipe of conf/recipe: its format, type, what it needs, and the first line of its comment."""
    import yaml

    from quantmill.config import find_conf_dir

    rows = []
    for path in sorted((find_conf_dir(conf_dir) / "recipe").glob("*.yaml")):
        text = path.read_text()
        body = (yaml.safe_load(text) or {}).get(path.stem, {})
        comment = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        requires = body.get("requires") or {}
        needs = [f"{k} {v}" for k, v in requires.items() if v not in (None, "any", [])]
        capability = _capability(body)
        if capability not in ("cpu", None) and not any(n.startswith("device") for n in needs):
            needs.insert(0, capability)
        if body.get("imatrix") or body.get("method") in ("awq", "gptq", "smoothquant") or \
                body.get("method") == "fp8" and "static" in path.stem:
            needs.append("calibration")
        rows.append({"name": path.stem, "format": body.get("format") or _format_of(body), "type": body.get(
            "quant_type") or "", "needs": ", ".join(needs) or "cpu", "about": comment})
    return rows


def _capability(body: dict[str, Any]) -> str | None:
    """What a machine must offer to make the recipe: its quantizer's capability (llamacpp, mlx, onnx, ...)."""
    from quantmill.backends import QUANTIZERS

    key = body.get("backend") or body.get("method")
    return QUANTIZERS.get(key).capability if key in QUANTIZERS else None


def _format_of(body: dict[str, Any]) -> str:
    return {"mlx": "mlx", "gguf": "gguf"}.get(body.get("method", ""), "safetensors")


def cmd_recipes(args: argparse.Namespace) -> int:
    from quantmill.cli import ui

    rows = recipe_rows(args.config_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        ui.out.print(ui.rows_table("recipes", rows, ["name", "format", "type", "needs", "about"]))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    import yaml

    from quantmill.cli import ui
    from quantmill.config import find_conf_dir

    rows = []
    for path in sorted((find_conf_dir(args.config_dir) / "target").glob("*.yaml")):
        t = yaml.safe_load(path.read_text()) or {}
        if not t.get("recipes"):
            continue
        rows.append({"name": path.stem, "memory": f"{t.get('memory_gb')} GB", "runtime": t.get("runtime", ""),
                     "recipes": ", ".join(t["recipes"]), "about": t.get("description", "")})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        ui.out.print(ui.rows_table("targets", rows, ["name", "memory", "runtime", "recipes", "about"]))
    return 0
