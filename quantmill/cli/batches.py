"""Batches, watches and triggers: ``quantmill batch``, ``watch`` and ``trigger``."""

from __future__ import annotations

import argparse
import json
import time

from quantmill.cli.common import add_command


def configure_parser(sub) -> dict[str, argparse.ArgumentParser]:
    p = add_command(sub, "batch", cmd_batch, "run every model x recipe of conf/batch/NAME.yaml (cached steps are not "
                    "re-run)", overrides=False, examples="examples:\n  quantmill batch nightly --dry-run\n"
                    "  quantmill batch nightly --submit\n")
    p.add_argument("name")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. store.root=/data")
    p.add_argument("--submit", action="store_true", help="submit each run to the server as a flow run instead")
    p.add_argument("--pool", help="the pool whose workers run submitted runs (default: infra.pipeline_pool)")
    p.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    p.add_argument("--json", action="store_true")
    w = add_command(sub, "watch", cmd_watch, "build the models of a batch whose upstream revision changed",
                    overrides=False, examples="example:\n  quantmill watch nightly --once\n")
    w.add_argument("name")
    w.add_argument("--once", action="store_true", help="one pass, then exit (the scheduled deployment does one)")
    w.add_argument("--interval", type=float, default=3600, help="seconds between passes without --once")
    w.add_argument("--json", action="store_true")
    t = add_command(sub, "trigger", cmd_trigger, "run exactly what a change to conf/ between two revisions calls for",
                    examples="example:\n  quantmill trigger --base origin/main --dry-run\n")
    t.add_argument("--base", required=True, help="the revision before the change (e.g. origin/main, HEAD~1)")
    t.add_argument("--head", default="HEAD", help="the revision with the change (default: HEAD)")
    t.add_argument("--repo", default=".", help="the git checkout (default: .)")
    t.add_argument("--conf-path", default="conf", help="conf/ inside the checkout")
    t.add_argument("--dry-run", action="store_true", help="print the plan (what runs, why); run nothing")
    t.add_argument("--submit", action="store_true", help="submit the runs to the server instead of running here")
    t.add_argument("--pool", help="the pool whose workers run submitted runs (default: infra.pipeline_pool)")
    t.add_argument("--json", action="store_true")
    return {"batch": p, "watch": w, "trigger": t}


def _carry_out(args: argparse.Namespace, conf_dir, runs, *, tags=()) -> list:
    """Run ``runs`` here, or submit them to the server with --submit; print each result."""
    from quantmill.cli import ui
    from quantmill.prefect import launch

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
    from quantmill.batches.watch import watch_once
    from quantmill.config import find_conf_dir
    from quantmill.prefect.launch import run_here

    conf_dir = find_conf_dir(args.config_dir)
    while True:
        report = watch_once(conf_dir, args.name, run_here, verbose=args.verbose)
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


