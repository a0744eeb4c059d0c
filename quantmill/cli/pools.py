"""Pools: ``quantmill server``, ``worker`` and ``deploy`` (``infra=prefect``)."""

from __future__ import annotations

import argparse

from quantmill.cli.common import add_command


def configure_parser(sub) -> dict[str, argparse.ArgumentParser]:
    p = add_command(sub, "worker", cmd_worker, "check this machine offers a pool's capabilities, then run a Prefect "
                    "worker for it (infra=prefect)", examples="example:\n  quantmill worker --pool cpu\n")
    p.add_argument("--pool", required=True, help="the pool to serve (a name under infra.pools)")
    p.add_argument("--name", help="worker name (default: POOL-HOST-PID)")
    p.add_argument("--cache-dir", default=".quantmill/worker-cache", help="this worker's cache of fetched artifacts")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often the worker asks for new runs")
    p.add_argument("--heartbeat-seconds", type=float, default=10.0,
                   help="heartbeat interval; a run's parent takes the worker as gone after 3 missed")
    p.add_argument("--limit", type=int, default=None, help="most step runs at once on this worker")
    s = add_command(sub, "server", cmd_server, "run a Prefect server for pools (SQLite by default)",
                    examples="example:\n  quantmill server --host 0.0.0.0 --port 4200\n")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=4200)
    s.add_argument("--database-url", help="e.g. postgresql+asyncpg://user:pass@host/db (default: SQLite)")
    s.add_argument("--home", help="PREFECT_HOME of the server (default: infra.prefect_home)")
    d = add_command(sub, "deploy", cmd_deploy, "create each configured pool, its deployment of the step flow, the "
                    "pipeline deployment for submitted runs and the scheduled watches, on the server")
    return {"worker": p, "server": s, "deploy": d}


def _infra(args: argparse.Namespace):
    """The infra config of ``infra=prefect`` plus the command's overrides."""
    from quantmill.config import compose, override_keys

    overrides = list(args.overrides)
    if "infra" not in override_keys(overrides):
        overrides.insert(0, "infra=prefect")
    return compose(overrides, conf_dir=args.config_dir).infra


def cmd_worker(args: argparse.Namespace) -> int:
    """Check this machine against the pool's capabilities, deploy the pool's step flow, then run a Prefect worker."""
    import os
    import signal
    import socket

    from quantmill.prefect import deploy, server, workers

    infra = _infra(args)
    name = args.name or f"{args.pool}-{socket.gethostname()}-{os.getpid()}"
    plan = workers.worker_plan(infra.pools, args.pool, name=name, cache_dir=args.cache_dir,
                              poll_seconds=args.poll_seconds, heartbeat_seconds=args.heartbeat_seconds,
                              limit=args.limit)
    url = server.connect(infra, verbose=args.verbose)
    deploy.deploy(infra, [args.pool], watches=_watches(args))
    for capability, found in plan.found.items():
        print(f"pool {args.pool}: {capability}: {found}")
    print(f"worker {name} on {url}, cache {plan.env['QUANTMILL_CACHE_DIR']}", flush=True)
    os.environ.update(plan.env)
    # SIGINT stops a worker: one started in the background by a script inherits it ignored, and an ignored signal
    # stays ignored across exec, so the worker (Prefect's or the warm one) gets it back at its default
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execv(plan.command[0], plan.command)  # the worker owns this process from here (signals, exit code)


def cmd_server(args: argparse.Namespace) -> int:
    """Run a Prefect server (SQLite under PREFECT_HOME, or the database URL given)."""
    import os
    from pathlib import Path

    from quantmill.prefect import server

    infra = _infra(args)
    home = Path(args.home or infra.prefect_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    command, env = server.server_command(host=args.host, port=args.port, database_url=args.database_url)
    os.environ.update(env, PREFECT_HOME=str(home))
    print(f"Prefect server on http://{args.host}:{args.port}/api (PREFECT_HOME {home}); point workers and runs at it "
          f"with PREFECT_API_URL=http://<this host>:{args.port}/api", flush=True)
    os.execv(command[0], command)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Create or update every configured pool and its step-flow deployment on the server."""
    from quantmill.prefect import deploy, server

    infra = _infra(args)
    server.connect(infra, verbose=args.verbose)
    for name in deploy.deploy(infra, watches=_watches(args)):
        print(f"deployed {name}")
    return 0


def _watches(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """batch -> (cron, timezone) for every batch file with a ``watch.cron``."""
    from quantmill.batches.batch import batch_names, load_batch
    from quantmill.config import find_conf_dir

    conf_dir = find_conf_dir(args.config_dir)
    batches = [load_batch(conf_dir, name) for name in batch_names(conf_dir)]
    return {b.name: (b.cron, b.timezone) for b in batches if b.cron}


