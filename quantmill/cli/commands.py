"""The ``quantmill`` command: run, plan, ls, show, verify.

Arguments after the command are Hydra overrides (``recipe=[gguf_q8_0,gguf_q6_k]``, ``store.root=/data``).
``run -m`` sweeps a matrix in process (Hydra multirun). The CLI is an entrypoint above ``flows/``: ``run``
imports the pipeline flow only when something has to run, so cached runs, ``plan`` and ``ls`` never start Prefect.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

from quantmill import __version__
from quantmill.errors import QuantmillError

log = logging.getLogger("quantmill")


def _compose(args: argparse.Namespace):
    from quantmill.config import compose

    return compose(args.overrides, conf_dir=args.config_dir)


def _plan_rows(the_plan, resolution) -> list[dict[str, Any]]:
    return [{"id": s.id, "step": s.step, "recipe": s.recipe, "backend": s.backend, "capability": s.capability,
             "inputs": dict(s.inputs), "key": resolution.keys.get(s.id), "cache": resolution.status[s.id],
             "config": dict(s.config), "tools": dict(s.tools)} for s in the_plan]


def cmd_plan(args: argparse.Namespace) -> int:
    """The target's fit (from config.json alone), then the steps with their keys and cache state."""
    from quantmill.cli import ui
    from quantmill.errors import ModelSourceError
    from quantmill.plan.planner import open_store, plan, resolve, target_fit

    cfg = _compose(args)
    fit = [f.to_json() for f in target_fit(cfg)]
    out: dict[str, Any] = {"model": cfg.model.name, "target": cfg.target.name if fit else None, "fit": fit}
    if fit and not args.json:
        ui.out.print(ui.fit_table(cfg.target, fit))
    store = open_store(cfg)
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


def run_config(cfg, *, verbose: bool = False) -> list:
    """Run one composed config embedded; return its outcomes. Starts Prefect only if something must run."""
    from quantmill.backends.calibrated import prestarted

    # Embedded, the torch quantizers' processes import their libraries (10+ s) while the run plans, Prefect
    # starts and the earlier steps run; the plan then stops those no step needs.
    with prestarted(_torch_quantizers(cfg) if cfg.infra.mode != "prefect" else []) as ahead:
        return _run_config(cfg, ahead, verbose=verbose)


def _torch_quantizers(cfg) -> list:
    from quantmill.backends import QUANTIZERS

    quantizers = []
    for recipe in cfg.recipe.values():
        try:
            quantizers.append(QUANTIZERS.get(recipe.backend or recipe.method))
        except QuantmillError:
            pass  # the planner reports it, in its words
    return quantizers


def run_configs(cfgs: list, *, verbose: bool = False) -> list:
    """Several composed configs: for each, its outcomes or the QuantmillError that stopped it before a step ran.

    On pools (every config ``infra.mode=prefect``, one server) the configs that have steps to run go to the server
    as one parent flow run, their steps side by side on the pools' workers; otherwise each runs in turn. There the
    configs are planned in order until one has steps to run; the parent starts with it and plans each later one
    when nothing else waits, so the first step runs go out before the batch is planned (50 plans: 0.7 s)."""
    from quantmill.errors import QuantmillError

    servers = {(c.infra.mode, c.infra.api_url) for c in cfgs}
    if len(cfgs) < 2 or len(servers) > 1 or cfgs[0].infra.mode != "prefect":
        results: list = []
        for cfg in cfgs:
            try:
                results.append(run_config(cfg, verbose=verbose))
            except QuantmillError as e:
                results.append(e)
        return results
    results: list = [None] * len(cfgs)
    stores: dict[bytes, Any] = {}  # each distinct store opened once for the batch: one client, records read once

    def made_for(i: int):
        """Config i's (cfg, store, plan, resolution) for the parent; or, with its result kept here, why it is not
        the parent's to run (every step cached, or refused in preflight)."""
        try:
            planned = _planned(cfgs[i], stores=stores)
        except QuantmillError as e:
            results[i] = e
            return f"refused: {e}"
        if isinstance(planned, list):
            results[i] = planned
            return "every step cached"
        return planned

    first, made = next(((i, m) for i in range(len(cfgs)) for m in [made_for(i)] if not isinstance(m, str)),
                       (None, None))
    if first is None:
        return results
    checked = set(made[2].routes.values())  # pools _run_on_pools checks before the parent starts

    def later(i: int):
        def made_later():  # called by the parent when it comes to config i, while earlier configs' steps run
            m = made_for(i)
            new = sorted(set(m[2].routes.values()) - checked) if not isinstance(m, str) else []
            if new:
                try:
                    _check_pools(new)
                except QuantmillError as e:
                    results[i] = e
                    return f"refused: {e}"
                checked.update(new)
            return m
        return made_later

    rest = range(first + 1, len(cfgs))
    for i, outcomes in zip(range(first, len(cfgs)),
                           _run_on_pools(cfgs[first:], [made, *map(later, rest)], verbose=verbose)):
        if outcomes is not None:
            results[i] = outcomes
    return results


def _planned(cfg, ahead=None, stores: dict[bytes, Any] | None = None):
    """Plan ``cfg`` and ask the store: the outcomes when every step is cached, else (cfg, store, plan,
    resolution) for a run; preflight errors raise here, before anything runs. ``stores``: stores already open,
    by their config, shared by the configs of one batch."""
    from quantmill import constants as C
    from quantmill.plan import planner
    from quantmill.backends import QUANTIZERS
    from quantmill.execute import read_result
    from quantmill.outcome import CACHED, Outcome
    from quantmill.store.local import LocalStore

    store = _open_store(cfg, stores)
    the_plan = planner.plan(cfg, store)
    resolution = planner.resolve(the_plan, store)
    if ahead is not None:
        ahead.expect(QUANTIZERS.get(s.backend) for s in the_plan
                     if s.step == C.QUANTIZE and resolution.status[s.id] != planner.HIT)
    if resolution.all_cached:
        from quantmill.evaluation import report

        outcomes = [Outcome(s.id, s.step, s.recipe, CACHED, 0.0, resolution.keys[s.id],
                            resolution.refs[s.id].digest, read_result(store, resolution.refs[s.id]))
                    for s in the_plan]
        if isinstance(store, LocalStore):
            report.update_from_outcomes(store, cfg.model.name, outcomes)
        return outcomes
    planner.check_space(the_plan, resolution, store)
    return cfg, store, the_plan, resolution


def _open_store(cfg, stores: dict[bytes, Any] | None):
    """The store of ``cfg``, from ``stores`` when one of the same config is open there.

    On S3, opening one makes a boto3 client (15 ms here) and a store reads each committed record once, so the
    runs of a batch that share a store and its artifacts (the model's download) ask the bucket for them once."""
    import dataclasses

    from quantmill.plan import planner
    from quantmill.digest import canonical_json

    if stores is None:
        return planner.open_store(cfg)
    key = canonical_json(dataclasses.asdict(cfg.store))
    if key not in stores:
        stores[key] = planner.open_store(cfg)
    return stores[key]


def _run_config(cfg, ahead, *, verbose: bool) -> list:
    from quantmill import progress
    from quantmill.prefect import runner
    from quantmill.cli import ui
    from quantmill.config import to_dict
    from quantmill.outcome import Outcome

    planned = _planned(cfg, ahead)
    if isinstance(planned, list):
        return planned
    if cfg.infra.mode == "prefect":
        return _run_on_pools([cfg], [planned], verbose=verbose)[0]
    runner.configure_embedded(cfg.infra, verbose=verbose)
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline

    flow = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, cfg.infra.max_parallel)))
    with ui.RichReporter() as reporter, progress.using(reporter), runner.without_run_heartbeats(), \
            runner.temporary_server_errors(cfg.infra):
        state = flow(to_dict(cfg), return_state=True)
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return [Outcome.from_json(d) for d in data]


def _run_on_pools(cfgs: list, made: list, *, verbose: bool) -> list[list | None]:
    """infra=prefect: this process runs the parent flow against the server (one for all of ``cfgs``); workers of
    each pool run the steps. ``made``: for each config, its (cfg, store, plan, resolution), or a function the
    parent calls when it comes to it (see ``flows.pipeline._HANDED_OVER``). Each config's outcomes, None for one
    that such a function said was not the parent's to run."""
    from contextlib import ExitStack

    from quantmill.prefect import runner
    from quantmill.config import to_dict
    from quantmill.outcome import Outcome

    runner.connect(cfgs[0].infra, verbose=verbose)
    _check_pools(sorted({p for m in made if not callable(m) for p in m[2].routes.values()}))
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import handed_over, pipeline_on_pools, pipelines_on_pools

    single = len(cfgs) == 1
    threads = sum(max(1, cfg.infra.max_parallel) for cfg in cfgs)  # a dispatch holds a thread while it waits
    flow = (pipeline_on_pools if single else pipelines_on_pools).with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=threads))
    configs = [to_dict(cfg) for cfg in cfgs]
    # A busy server (SQLite, many runs starting at once) may refuse to create the run; a retry re-plans, and steps
    # that finished in a refused attempt are answered from the store.
    for attempt in range(5):
        try:
            with ExitStack() as stack:
                for config, m in zip(configs, made):
                    if callable(m) or not attempt:  # a retry's parent plans again what was planned here
                        stack.enter_context(handed_over(config, m))
                stack.enter_context(runner.without_run_heartbeats())
                state = flow(configs[0] if single else configs, return_state=True)
            break
        except Exception as e:  # noqa: BLE001 - only the server's "busy" answers are retried
            if attempt == 4 or not runner.transient(e):
                raise
            time.sleep(2 * (attempt + 1))
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return [None if run is None else [Outcome.from_json(d) for d in run] for run in ([data] if single else data)]


def _check_pools(pools: list[str]) -> None:
    """Refuse pools with no deployment on the server; warn, on stderr (stdout carries the report: `--json` must
    parse), of those with no worker online."""
    from quantmill.prefect import runner

    from quantmill.cli import ui
    for warning in runner.check_deployments(pools):
        ui.console.print(f"[yellow]{warning}[/]")


def _run_and_report(cfg, args: argparse.Namespace) -> bool:
    from quantmill.cli import ui

    start = time.perf_counter()
    outcomes = run_config(cfg, verbose=args.verbose)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"seconds": round(elapsed, 3), "steps": [o.to_json() for o in outcomes]}, indent=1))
    else:
        ui.out.print(ui.summary_table(outcomes, elapsed))
    return all(o.ok for o in outcomes)


def cmd_run(args: argparse.Namespace) -> int:
    if args.force:  # publish what fails a gate, marked unvalidated in its card, entry and the catalogue
        args.overrides = [*args.overrides, "validate.enforce=false"]
    if args.multirun:
        return _multirun(args)
    return 0 if _run_and_report(_compose(args), args) else 1


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
        from hydra_plugins.quantmill_launcher.prefect_launcher import SUBMITTED

        if args.json:
            print(json.dumps({"submitted": SUBMITTED}, indent=1))
        for s in SUBMITTED if not args.json else []:
            print(f"submitted {s['name']} ({' '.join(s['overrides'])}): flow run {s['flow_run_id']}"
                  + (f", {s['state']}" if s["state"] else ""))
        return 0 if SUBMITTED and all(s["state"] in (None, "COMPLETED") for s in SUBMITTED) else 1
    return 0 if results and all(results) else 1


def _registry(args: argparse.Namespace):
    """(the registry's store, the registry) of the configured publisher (``publish=s3 publish.bucket=...``)."""
    import dataclasses

    from quantmill.backends import PUBLISHERS
    from quantmill.errors import ConfigError
    from quantmill.plan.planner import open_store

    cfg = _compose(args)
    args.publish_config = cfg.publish
    publisher = PUBLISHERS.get(cfg.publish.publisher)
    if not hasattr(publisher, "registry"):  # only registry publishers keep the versioned layout listed here
        raise ConfigError(f"publish.publisher={cfg.publish.publisher!r} cannot be listed; the team registry is "
                          f"publish=local or publish=s3")
    store = open_store(cfg) if cfg.publish.publisher == "local" else None  # a bucket registry needs no local store
    if store is None:
        publisher.check(cfg.publish, store)
    registry = publisher.registry({**dataclasses.asdict(cfg.publish), "cache_dir": cfg.store.cache_dir}, store)
    return registry.store, registry


def cmd_ls(args: argparse.Namespace) -> int:
    _, registry = _registry(args)
    return _print_entries(args, registry.entries())


def _print_entries(args: argparse.Namespace, entries: list) -> int:
    from quantmill.cli import ui

    if args.json:
        print(json.dumps(entries, indent=1))
    else:
        ui.out.print(ui.registry_table(entries))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from quantmill.cli import ui

    store, registry = _registry(args)
    entry = registry.get(args.name, args.version)
    key = entry["artifact"]["key"]
    statement = store.statement(key)
    problems = store.verify(key)
    if args.json:
        print(json.dumps({"entry": entry, "card": registry.card(args.name, entry["version"]),
                          "provenance": statement, "verified": not problems, "problems": problems}, indent=1))
        return 0 if not problems else 1
    ui.out.print(registry.card(args.name, entry["version"]))
    ui.out.print(f"[bold]files[/bold] ({store.files(_artifact_ref(entry))}):")
    for s in statement["subject"]:
        ui.out.print(f"  {s['name']}  sha256:{s['digest']['sha256']}")
    ui.out.print("[green]provenance verified[/green]" if not problems else
                 "[red]provenance does NOT verify:[/red]\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


def _artifact_ref(entry: dict[str, Any]):
    """The artifact a registry entry names."""
    from quantmill.store.local import ArtifactRef

    return ArtifactRef(entry["artifact"]["key"], entry["artifact"]["digest"], "")


def cmd_report(args: argparse.Namespace) -> int:
    from quantmill.evaluation import report
    from quantmill.cli import ui
    from quantmill.errors import NotFound
    from quantmill.plan.planner import open_store

    cfg = _compose(args)
    store = open_store(cfg)
    model = args.model or cfg.model.name
    data = report.load(store, model)
    if data is None:
        raise NotFound(f"no validation report for model {model!r} in {store.root}; run the pipeline first")
    if args.json:
        print(json.dumps(data, indent=1, ensure_ascii=False))
        return 0
    ui.out.print(ui.report_table(data))
    ui.out.print(f"HTML: {report.report_dir(store, model) / 'report.html'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store, registry = _registry(args)
    key = args.target
    if not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
        key = registry.get(args.target)["artifact"]["key"]
    problems = store.verify(key)
    for p in problems:
        print(f"{args.target}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.target}: verified ({len(store.statement(key)['subject'])} files)")
    return 0 if not problems else 1


def _infra(args: argparse.Namespace):
    """The infra config of ``infra=prefect`` plus the command's overrides."""
    from quantmill.config import compose

    overrides = list(args.overrides)
    if not any(o.split("=")[0].lstrip("+~") == "infra" for o in overrides):
        overrides.insert(0, "infra=prefect")
    return compose(overrides, conf_dir=args.config_dir).infra


def cmd_worker(args: argparse.Namespace) -> int:
    """Check this machine against the pool's capabilities, deploy the pool's step flow, then run a Prefect worker."""
    import os
    import socket

    from quantmill.prefect import runner

    infra = _infra(args)
    name = args.name or f"{args.pool}-{socket.gethostname()}-{os.getpid()}"
    plan = runner.worker_plan(infra.pools, args.pool, name=name, cache_dir=args.cache_dir,
                              poll_seconds=args.poll_seconds, heartbeat_seconds=args.heartbeat_seconds,
                              limit=args.limit)
    url = runner.connect(infra, verbose=args.verbose)
    runner.deploy(infra, [args.pool], watches=_watches(args))
    for capability, found in plan.found.items():
        print(f"pool {args.pool}: {capability}: {found}")
    print(f"worker {name} on {url}, cache {plan.env['QUANTMILL_CACHE_DIR']}", flush=True)
    os.environ.update(plan.env)
    os.execv(plan.command[0], plan.command)  # the worker owns this process from here (signals, exit code)


def cmd_server(args: argparse.Namespace) -> int:
    """Run a Prefect server (SQLite under PREFECT_HOME, or the database URL given)."""
    import os
    from pathlib import Path

    from quantmill.prefect import runner

    infra = _infra(args)
    home = Path(args.home or infra.prefect_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    command, env = runner.server_command(host=args.host, port=args.port, database_url=args.database_url)
    os.environ.update(env, PREFECT_HOME=str(home))
    print(f"Prefect server on http://{args.host}:{args.port}/api (PREFECT_HOME {home}); point workers and runs at it "
          f"with PREFECT_API_URL=http://<this host>:{args.port}/api", flush=True)
    os.execv(command[0], command)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Create or update every configured pool and its step-flow deployment on the server."""
    from quantmill.prefect import runner

    infra = _infra(args)
    runner.connect(infra, verbose=args.verbose)
    for name in runner.deploy(infra, watches=_watches(args)):
        print(f"deployed {name}")
    return 0


def _watches(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """batch -> (cron, timezone) for every batch file with a ``watch.cron``."""
    from quantmill.batches.batch import batch_names, load_batch
    from quantmill.config import find_conf_dir

    conf_dir = find_conf_dir(args.config_dir)
    batches = [load_batch(conf_dir, name) for name in batch_names(conf_dir)]
    return {b.name: (b.cron, b.timezone) for b in batches if b.cron}


# -- batches, watches, triggers --------------------------------------------------------------------------------
def _carry_out(args: argparse.Namespace, conf_dir, runs, *, tags=()) -> list:
    """Run ``runs`` here, or submit them to the server with --submit; print each result."""
    from quantmill.prefect import launch

    from quantmill.cli import ui
    if getattr(args, "submit", False):
        results = launch.submit(conf_dir, runs, pool=args.pool, verbose=args.verbose, extra=args.overrides, tags=tags)
        for r in results:
            ui.out.print(f"submitted {r.id}: flow run {r.flow_run_id}") if not args.json else None
        return results
    results = launch.run_here(conf_dir, runs, verbose=args.verbose, extra=args.overrides)
    if not args.json:
        for r in results:
            status = "[green]ok[/]" if r.ok else f"[red]failed[/]: {r.error}"
            ui.out.print(f"{r.id}: {status} ({r.ran} steps ran, {r.cached} cached)")
    return results


def cmd_batch(args: argparse.Namespace) -> int:
    """Every run of conf/batch/NAME.yaml, here (cached steps are not re-run) or submitted to the server."""
    from quantmill.batches.batch import batch_runs, load_batch
    from quantmill.config import find_conf_dir

    conf_dir = find_conf_dir(args.config_dir)
    start = time.perf_counter()
    runs = batch_runs(conf_dir, load_batch(conf_dir, args.name))
    if args.dry_run:
        results = []
    else:
        results = _carry_out(args, conf_dir, runs, tags=[f"batch:{args.name}"])
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({"batch": args.name, "seconds": round(elapsed, 3), "runs": [r.to_json() for r in runs],
                          "results": [r.to_json() for r in results]}, indent=1))
    elif args.dry_run:
        for run in runs:
            print(f"{run.id}  ({run.where})")
    else:
        print(f"batch {args.name}: {len(runs)} runs in {elapsed:.1f} s")
    return 0 if all(r.ok for r in results) else 1


def cmd_watch(args: argparse.Namespace) -> int:
    """Build the models of a batch whose upstream revision changed: once, or every --interval seconds."""
    from quantmill.config import find_conf_dir
    from quantmill.batches.watch import watch_once

    conf_dir = find_conf_dir(args.config_dir)
    while True:
        report = watch_once(conf_dir, args.name, verbose=args.verbose)
        if args.json:
            print(json.dumps(report, indent=1), flush=True)
        else:
            for m in report["models"]:
                if not m["changed"]:
                    print(f"{m['model']}: unchanged")
                    continue
                failed = [r["id"] for r in m["results"] if not r["ok"]]
                print(f"{m['model']}: {'new' if m['previous'] is None else 'changed'} upstream; ran "
                      f"{', '.join(m['runs'])}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
            print(f"watch {args.name}: {report['triggered']} runs triggered in {report['seconds']:.1f} s", flush=True)
        ok = all(r["ok"] for m in report["models"] for r in m["results"])
        if args.once:
            return 0 if ok else 1
        time.sleep(args.interval)


def cmd_trigger(args: argparse.Namespace) -> int:
    """The runs a range of commits calls for: composed at both revisions, compared by resolved config."""
    from pathlib import Path

    from quantmill.batches import trigger
    from quantmill.config import find_conf_dir

    repo = Path(args.repo).resolve()
    base, head, changes = trigger.changes(repo, args.base, args.head, args.conf_path)
    to_run = [c.run for c in changes if c.action == "run"]
    if args.json:
        out = {"base": base, "head": head, "changes": [c.to_json() for c in changes], "results": []}
    else:
        print(f"conf/ {base[:12]}..{head[:12]}: {len(to_run)} runs to go, "
              f"{sum(c.action == 'removed' for c in changes)} removed")
        for c in changes:
            print(f"  {'run    ' if c.action == 'run' else 'removed'} {c.run.id}: {c.why}")
    results = []
    if to_run and not args.dry_run:
        # the runs are composed from conf/ at head: this checkout must be at head (CI checks it out so)
        conf_dir = find_conf_dir(args.config_dir or repo / args.conf_path)
        if trigger.resolve_rev(repo, "HEAD") != head:
            from quantmill.errors import QuantmillError

            raise QuantmillError(f"the checkout at {repo} is not at head {head[:12]}; check out {args.head} first, or "
                                 f"pass --dry-run to only list the runs")
        results = _carry_out(args, conf_dir, to_run, tags=[f"trigger:{head[:12]}"])
    if args.json:
        out["results"] = [r.to_json() for r in results]
        print(json.dumps(out, indent=1))
    return 0 if all(r.ok for r in results) else 1


# -- the team registry ------------------------------------------------------------------------------------------
def cmd_registry(args: argparse.Namespace) -> int:
    return REGISTRY_COMMANDS[args.registry_command](args)


def _keys(args: argparse.Namespace) -> list:
    from quantmill.registry.operations import keys_for

    return keys_for(args.publish_config, list(getattr(args, "key", None) or []))


def reg_ls(args: argparse.Namespace) -> int:
    from quantmill.registry.operations import Filters, search

    _, registry = _registry(args)
    target = None
    if args.fits:
        from quantmill.config import compose

        target = compose([f"target={args.fits}", "recipe=[gguf_q8_0]"], conf_dir=args.config_dir).target
    return _print_entries(args, search(registry, Filters(
        model=args.model, format=args.format, bits=args.bits, max_kld=args.max_kld, max_ppl_ratio=args.max_ppl_ratio,
        fits=target, tag=args.tag)))


def reg_show(args: argparse.Namespace) -> int:
    from quantmill.cli import ui
    from quantmill.registry.entries import PROVENANCE

    _, registry = _registry(args)
    name, v = registry.resolve(args.name)
    entry = registry.get(name, v)
    keys = _keys(args)
    statement, _, signer = registry.signed_record(name, v, keys, require=False)
    if args.json:
        print(json.dumps({"entry": entry, "card": registry.card(name, v), "provenance": statement,
                          "signed_by": entry.get("signed_by"), "signature_verified_with": signer,
                          "tags": registry.tags(name)}, indent=1))
        return 0
    ui.out.print(registry.card(name, v))
    ui.out.print(f"[bold]{name}:v{v}[/] in {registry.root}; tags: {', '.join(sorted(registry.tags(name))) or 'none'}")
    for s in statement["subject"]:
        ui.out.print(f"  {s['name']}  sha256:{s['digest']['sha256']}")
    signature = ("[green]signature verified[/] (key " + signer[:16] + "…)" if signer else
                 f"signed by key {entry['signed_by'][:16]}… (no trusted key given to check it)" if entry.get("signed_by")
                 else "not signed")
    ui.out.print(f"provenance: {registry.location.version_path(name, v, PROVENANCE)}; {signature}")
    return 0


def reg_lineage(args: argparse.Namespace) -> int:
    from quantmill.registry.operations import lineage_of

    _, registry = _registry(args)
    hops = lineage_of(registry, args.name)
    if args.json:
        print(json.dumps(hops, indent=1))
        return 0
    for i, hop in enumerate(hops):
        source = "".join(f"  from {s['uri']}" for s in hop["sources"])
        side = "".join(f"  + {k}: {v}" for k, v in hop["side_inputs"].items())
        print(f"{'  ' * i}{'└─ ' if i else ''}{hop['step']:<9} {hop['spec']:<28} {hop['digest']}{source}{side}")
    return 0


def reg_pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantmill.registry.operations import pull

    _, registry = _registry(args)
    name, _ = registry.resolve(args.name)
    result = pull(registry, args.name, Path(args.to or name), _keys(args), require_signature=args.require_signature)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        signed = f", signature verified (key {result['signed_by'][:16]}…)" if result["signed_by"] else ""
        print(f"{result['name']}:v{result['version']} -> {result['to']}: {len(result['files'])} files verified{signed}")
    return 0


def reg_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantmill.registry.operations import verify_name, verify_path

    path = Path(args.target)
    if path.is_dir():
        args.publish_config = _compose(args).publish
        problems = verify_path(path, _keys(args), require_signature=args.require_signature)
    else:
        _, registry = _registry(args)
        problems = verify_name(registry, args.target, _keys(args), require_signature=args.require_signature)
    for p in problems:
        print(f"{args.target}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.target}: verified")
    return 0 if not problems else 1


def reg_promote(args: argparse.Namespace) -> int:
    _, registry = _registry(args)
    v = registry.promote(args.name, args.tag, args.version)
    print(f"{args.name.split(':')[0]}:{args.tag} -> v{v}")
    return 0


def reg_gc(args: argparse.Namespace) -> int:
    from quantmill.registry.operations import gc_apply, gc_plan

    _, registry = _registry(args)
    plan = gc_plan(registry, args.keep_days)
    if args.json:
        print(json.dumps({**plan, "dry_run": args.dry_run}, indent=1))
    else:
        for version in plan["versions"]:
            print(f"{'would delete' if args.dry_run else 'deleting'} registry entry {version}")
        for key in plan["objects"]:
            print(f"{'would delete' if args.dry_run else 'deleting'} object {key}")
        print(f"{len(plan['objects'])} objects, {len(plan['versions'])} entries unreferenced")
    if not args.dry_run:
        gc_apply(registry, plan)
    return 0


def reg_keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantmill.store import signing

    private, public = signing.generate(Path(args.out), args.name)
    print(f"private key {private} (keep it secret: publish.signing_key or $QUANTMILL_SIGNING_KEY)\n"
          f"public key  {public} (share it: publish.trusted_keys)")
    return 0


def reg_catalogue(args: argparse.Namespace) -> int:
    from quantmill.registry.catalogue import write_catalogue

    _, registry = _registry(args)
    print(write_catalogue(registry))
    return 0


REGISTRY_COMMANDS = {"ls": reg_ls, "show": reg_show, "lineage": reg_lineage, "pull": reg_pull, "verify": reg_verify,
                     "promote": reg_promote, "gc": reg_gc, "keygen": reg_keygen, "catalogue": reg_catalogue}


def _registry_parser(sub) -> dict[str, argparse.ArgumentParser]:
    p = sub.add_parser("registry", help="the team registry: search, show, lineage, pull, verify, promote, gc",
                       description="The team registry of the configured publisher (publish=local or publish=s3 "
                                   "publish.bucket=...). Hydra overrides may follow any subcommand.")
    p.set_defaults(func=cmd_registry)
    rs = p.add_subparsers(dest="registry_command", required=True)
    parsers: dict[str, argparse.ArgumentParser] = {}

    def sub_command(name: str, help_: str, *, target: str | None = "name") -> argparse.ArgumentParser:
        q = rs.add_parser(name, help=help_, description=help_)
        parsers[name] = q
        q.add_argument("--config-dir", help="the conf/ directory (default: $QUANTMILL_CONF or ./conf)")
        q.add_argument("-v", "--verbose", action="store_true")
        if target:
            q.add_argument(target)
        q.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. publish=s3 publish.bucket=team")
        return q

    q = sub_command("ls", "published artifacts, filtered by measured quality", target=None)
    q.add_argument("--model")
    q.add_argument("--format", help="gguf, mlx, safetensors, compressed-tensors, ...")
    q.add_argument("--bits", type=int, help="nominal bits (Q4_K_M: 4, W8A16: 8, F16: 16)")
    q.add_argument("--max-kld", type=float, help="mean KL divergence against the unquantized model at most this")
    q.add_argument("--max-ppl-ratio", type=float, help="perplexity ratio at most this (1.03: 3 %% worse)")
    q.add_argument("--fits", metavar="TARGET", help="fits a conf/target profile (weights + KV cache + overhead)")
    q.add_argument("--tag", help="only versions carrying this tag")
    q.add_argument("--json", action="store_true")
    q = sub_command("show", "model card, metrics, files and provenance of NAME[:vN|:TAG]")
    q.add_argument("--key", action="append", help="a trusted public key file (also publish.trusted_keys)")
    q.add_argument("--json", action="store_true")
    q = sub_command("lineage", "base -> merged -> F16 -> quant: the step and digest of each hop")
    q.add_argument("--json", action="store_true")
    q = sub_command("pull", "download NAME[:vN|:TAG], every digest and the signature verified before writing")
    q.add_argument("--to", help="directory to create (default: ./NAME)")
    q.add_argument("--key", action="append", help="a trusted public key file (also publish.trusted_keys)")
    q.add_argument("--require-signature", action="store_true", help="refuse what is not signed by a trusted key")
    q.add_argument("--json", action="store_true")
    q = sub_command("verify", "re-hash a pulled directory or a published NAME against its signed record",
                    target="target")
    q.add_argument("--key", action="append", help="a trusted public key file (also publish.trusted_keys)")
    q.add_argument("--require-signature", action="store_true")
    q = sub_command("promote", "tag a version (default: the latest): NAME --tag stable")
    q.add_argument("--tag", required=True)
    q.add_argument("--version", help="vN or N (default: latest)")
    q = sub_command("gc", "delete objects no name, tag or recent run references", target=None)
    q.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    q.add_argument("--keep-days", type=float, default=7.0, help="keep what a run made within this many days")
    q.add_argument("--json", action="store_true")
    q = sub_command("keygen", "make an Ed25519 key pair for signing provenance records", target=None)
    q.add_argument("--out", default="keys", help="directory for NAME.key and NAME.pub.json")
    q.add_argument("--name", default="quantmill")
    sub_command("catalogue", "rewrite the registry's catalogue page (index.html)", target=None)
    return parsers


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (help, version) and one parser per command; overrides may follow options."""
    parser = argparse.ArgumentParser(prog="quantmill", description="A declarative factory for quantized LLMs.")
    parser.add_argument("--version", action="version", version=f"quantmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, func, help_: str, *, overrides: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        commands[name] = p
        p.set_defaults(func=func)
        p.add_argument("--config-dir", help="the conf/ directory (default: $QUANTMILL_CONF or ./conf)")
        p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's and the tools' logs")
        if overrides:
            p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=[gguf_q8_0] store.root=/data")
        return p

    p = command("run", cmd_run, "run the pipeline (embedded Prefect flow); cached steps are not re-run")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated overrides (a matrix)")
    p.add_argument("--force", action="store_true",
                   help="publish artifacts that fail a validation gate, marked unvalidated (validate.enforce=false)")
    p.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    p = command("plan", cmd_plan, "show the steps, their keys and cache hit/miss; runs nothing")
    p.add_argument("--json", action="store_true")
    p = command("ls", cmd_ls, "list published artifacts")
    p.add_argument("--json", action="store_true")
    p = command("show", cmd_show, "show a published artifact: model card, files, provenance", overrides=False)
    p.add_argument("name")
    p.add_argument("--version", type=int, dest="version", default=None, help="a version number (default: latest)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    p = command("report", cmd_report, "the validation report of a model: metrics of every artifact, and its HTML page",
                overrides=False)
    p.add_argument("--model", help="model name (default: the configured model's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    p = command("verify", cmd_verify, "re-hash a published artifact (NAME) or an artifact key against its provenance",
                overrides=False)
    p.add_argument("target")
    p.add_argument("overrides", nargs="*")
    p = command("worker", cmd_worker, "check this machine offers a pool's capabilities, then run a Prefect worker "
                                      "for it (infra=prefect)")
    p.add_argument("--pool", required=True, help="the pool to serve (a name under infra.pools)")
    p.add_argument("--name", help="worker name (default: POOL-HOST-PID)")
    p.add_argument("--cache-dir", default=".quantmill/worker-cache", help="this worker's cache of fetched artifacts")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often the worker asks for new runs")
    p.add_argument("--heartbeat-seconds", type=float, default=10.0,
                   help="heartbeat interval; a run's parent takes the worker as gone after 3 missed")
    p.add_argument("--limit", type=int, default=None, help="most step runs at once on this worker")
    p = command("server", cmd_server, "run a Prefect server for pools (SQLite by default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--database-url", help="e.g. postgresql+asyncpg://user:pass@host/db (default: SQLite)")
    p.add_argument("--home", help="PREFECT_HOME of the server (default: infra.prefect_home)")
    command("deploy", cmd_deploy, "create each configured pool, its deployment of the step flow, the pipeline "
                                  "deployment for submitted runs and the scheduled watches, on the server")
    p = command("batch", cmd_batch, "run every model x recipe of conf/batch/NAME.yaml (cached steps are not re-run)",
                overrides=False)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. store.root=/data")
    p.add_argument("--submit", action="store_true", help="submit each run to the server as a flow run instead")
    p.add_argument("--pool", help="the pool whose workers run submitted runs (default: infra.pipeline_pool)")
    p.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    p.add_argument("--json", action="store_true")
    p = command("watch", cmd_watch, "build the models of a batch whose upstream revision changed", overrides=False)
    p.add_argument("name")
    p.add_argument("--once", action="store_true", help="one pass, then exit (the scheduled deployment does one)")
    p.add_argument("--interval", type=float, default=3600, help="seconds between passes without --once")
    p.add_argument("--json", action="store_true")
    p = command("trigger", cmd_trigger, "run exactly what a change to conf/ between two revisions calls for")
    p.add_argument("--base", required=True, help="the revision before the change (e.g. origin/main, HEAD~1)")
    p.add_argument("--head", default="HEAD", help="the revision with the change (default: HEAD)")
    p.add_argument("--repo", default=".", help="the git checkout (default: .)")
    p.add_argument("--conf-path", default="conf", help="conf/ inside the checkout")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what runs, why); run nothing")
    p.add_argument("--submit", action="store_true", help="submit the runs to the server instead of running here")
    p.add_argument("--pool", help="the pool whose workers run submitted runs (default: infra.pipeline_pool)")
    p.add_argument("--json", action="store_true")
    for name, p in _registry_parser(sub).items():
        commands[f"registry {name}"] = p
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if argv[:1] == ["registry"] and f"registry {argv[1:2][0] if argv[1:] else ''}" in commands:
        args = commands[f"registry {argv[1]}"].parse_intermixed_args(argv[2:])
        args.func, args.registry_command = cmd_registry, argv[1]
    elif argv and argv[0] in commands:  # Hydra overrides may come before or after a command's options
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except QuantmillError as e:
        print(f"quantmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantmill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
