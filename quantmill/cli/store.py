"""``quantmill store check [--repair]``: the local store's incomplete commits, damaged objects and stale staging."""

from __future__ import annotations

import argparse
import json

from quantmill.cli.common import add_command, compose


def configure_parser(sub) -> dict[str, argparse.ArgumentParser]:
    p = sub.add_parser("store", help="check the local store (and repair it)",
                       description="Check the local store (store.root): objects without a provenance record, objects "
                                   "whose files no longer match it, staging folders no live process owns.")
    ss = p.add_subparsers(dest="store_command", required=True)
    q = add_command(ss, "check", cmd_check, "list what is wrong in the store; --repair moves broken objects to "
                    "damaged/ and removes stale staging", examples="examples:\n  quantmill store check\n"
                    "  quantmill store check --repair store.root=/data/quants\n")
    q.add_argument("--repair", action="store_true", help="move broken objects aside, remove stale staging")
    q.add_argument("--full", action="store_true", help="re-hash every file (default: what changed since hashed)")
    q.add_argument("--json", action="store_true")
    return {"store check": q}


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantmill.errors import ConfigError
    from quantmill.store import LocalStore
    from quantmill.store.check import check

    cfg = compose(args)
    root = Path(cfg.store.root).expanduser()
    if cfg.store.kind != "local":
        raise ConfigError(f"store.kind {cfg.store.kind!r}: `store check` looks at a local store; a bucket's objects "
                          f"are verified when fetched")
    if not (root / "objects").is_dir():  # never create a store where the user mistyped its path
        raise ConfigError(f"store.root {root.resolve()} holds no store (no objects/ folder); fix store.root")
    report = check(LocalStore(root), repair=args.repair, full=args.full)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for line in report.lines():
            print(line)
        for line in report.repaired:
            print(f"repaired: {line}")
        if report.clean:
            print(f"store {root.resolve()}: clean")
    return 0 if report.clean or args.repair else 1
