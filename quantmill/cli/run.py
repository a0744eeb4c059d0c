"""``quantmill run`` and ``quantmill plan``: the pipeline of a config, run (embedded or on pools) or only shown.

Arguments after the command are Hydra overrides (``recipe=[gguf_q8_0,gguf_q6_k]``, ``store.root=/data``).
``run -m`` sweeps a matrix in process (Hydra multirun), or submits it with ``hydra/launcher=prefect``.
Prefect starts only when a step has to run: cached runs and ``plan`` never start it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from quantmill.cli.common import add_command, compose

RUN_EXAMPLES = """examples:
  quantmill run                                            the default pipeline (conf/config.yaml)
  quantmill run 'recipe=[gguf_q8_0,gguf_q4_k_m]'           two recipes; shared steps run once
  quantmill run model=local model.path=/models/llama model.name=llama
  quantmill run -m 'recipe=[gguf_q8_0],[gguf_q5_k_m]'      a matrix, one run per combination
"""
PLAN_EXAMPLES = """examples:
  quantmill plan                                           steps, cache keys, hit/miss
  quantmill plan target=rtx2060_12gb model=local model.path=/models/llama-7b   will it fit?
"""


def configure_parser(sub) -> dict[str, argparse.ArgumentParser]:
    p = add_command(sub, "run", cmd_run, "run the pipeline (embedded Prefect flow); cached steps are not re-run",
                    examples=RUN_EXAMPLES)
    p.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated overrides (a matrix)")
    p.add_argument("--force", action="store_true",
                   help="publish artifacts that fail a validation gate, marked unvalidated (validate.enforce=false)")
    p.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    q = add_command(sub, "plan", cmd_plan, "show the steps, their keys and cache hit/miss; runs nothing",
                    examples=PLAN_EXAMPLES)
    q.add_argument("--json", action="store_true")
    return {"run": p, "plan": q}


def _plan_rows(the_plan, resolution) -> list[dict[str, Any]]:
    return [{"id": s.id, "step": s.step, "recipe": s.recipe, "backend": s.backend, "capability": s.capability,
             "inputs": dict(s.inputs), "key": resolution.keys.get(s.id), "cache": resolution.status[s.id],
             "config": dict(s.config), "tools": dict(s.tools)} for s in the_plan]


def cmd_plan(args: argparse.Namespace) -> int:
    """The target's fit (measured where the registry holds it, else from config.json), then the steps with their
    keys and cache state."""
    from quantmill.cli import ui
    from quantmill.errors import ModelSourceError
    from quantmill.plan.build import plan
    from quantmill.plan.spec import resolve
    from quantmill.plan.targets import measured_fit
    from quantmill.store import open_store

    cfg = compose(args)
    store = open_store(cfg.store)
    fit, note = measured_fit(cfg, store)
    out: dict[str, Any] = {"model": cfg.model.name, "target": cfg.target.name if fit else None, "fit": fit,
                           **({"fit_note": note} if note else {})}
    if fit and not args.json:
        ui.out.print(ui.fit_table(cfg.target, fit))
        if note:
            ui.out.print(f"[yellow]{note}[/]")
    try:
        the_plan = plan(cfg, store)
    except ModelSourceError as e:
        if not fit:
            raise
        # Sizing a model before downloading it: the fit above needs only its config.json (already read, so what is
        # missing is the rest of the checkpoint).
        out.update({"steps": None, "note": f"{e}: only the fit was estimated"})
        print(json.dumps(out, indent=1)) if args.json else ui.out.print(f"[yellow]{out['note']}[/]")
        return 0
    rows = _plan_rows(the_plan, resolve(the_plan, store))
    out.update({"source": the_plan.source.uri, "warnings": the_plan.warnings, "steps": rows})
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for w in the_plan.warnings:
            ui.out.print(f"[yellow]{w}[/]")
        ui.out.print(ui.plan_table(rows))
    return 0


def _run_and_report(cfg, args: argparse.Namespace) -> bool:
    from quantmill import progress
    from quantmill.cli import ui
    from quantmill.outcome import FAILED
    from quantmill.prefect.launch import run_config

    if cfg.target.name != "none":  # the target's decision table picked the recipes (unless recipe= was given)
        ui.console.print(f"target {cfg.target.name}: {', '.join(cfg.recipe)} (conf/target/{cfg.target.name}.yaml; "
                         f"recipe=[...] chooses others)", highlight=False)
    start = time.perf_counter()
    with progress.using(ui.RichReporter()):
        outcomes = run_config(cfg, verbose=args.verbose)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"seconds": round(elapsed, 3), "steps": [o.to_json() for o in outcomes]}, indent=1))
    else:
        ui.out.print(ui.summary_table(outcomes, elapsed))
        for line in ui.next_steps(outcomes, cfg.publish, cfg.model.name):
            ui.out.print(line, highlight=False)
    for o in outcomes:  # stdout carries the table (or JSON); each failure is one line on stderr
        if o.status == FAILED:
            print(f"quantmill: error: {o.spec_id}: {o.error}", file=sys.stderr)
    return all(o.ok for o in outcomes)


def cmd_run(args: argparse.Namespace) -> int:
    if args.force:  # publish what fails a gate, marked unvalidated in its card, entry and the catalogue
        args.overrides = [*args.overrides, "validate.enforce=false"]
    if args.multirun:
        return _multirun(args)
    return 0 if _run_and_report(compose(args), args) else 1


def _multirun(args: argparse.Namespace) -> int:
    """Hydra multirun: every combination of the comma-separated overrides, run one after another here, or
    submitted to the Prefect server as flow runs with ``hydra/launcher=prefect``."""
    import hydra
    from omegaconf import DictConfig

    from quantmill.config import find_conf_dir, register_schemas, to_config

    register_schemas()
    results: list[bool] = []

    @hydra.main(config_path=str(find_conf_dir(args.config_dir)), config_name="config", version_base="1.3")
    def job(cfg: DictConfig) -> None:
        results.append(_run_and_report(to_config(cfg), args))

    argv = sys.argv
    sys.argv = ["quantmill", "--multirun", "hydra/job_logging=none", "hydra/hydra_logging=none", *args.overrides]
    try:
        job()
    finally:
        sys.argv = argv
    if any(o.replace(" ", "") == "hydra/launcher=prefect" for o in args.overrides):
        from quantmill.prefect.launch import SWEEP_SUBMISSIONS as SUBMITTED

        if args.json:
            print(json.dumps({"submitted": SUBMITTED}, indent=1))
        for s in SUBMITTED if not args.json else []:
            print(f"submitted {s['name']} ({' '.join(s['overrides'])}): flow run {s['flow_run_id']}"
                  + (f", {s['state']}" if s["state"] else ""))
        return 0 if SUBMITTED and all(s["state"] in (None, "COMPLETED") for s in SUBMITTED) else 1
    return 0 if results and all(results) else 1


