"""What every command shares: the options every command takes and the composed config of its overrides."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_command(sub, name: str, func, help_: str, *, overrides: bool = True, examples: str = "") -> argparse.ArgumentParser:
    """A subcommand with the options every command takes; ``overrides`` adds the trailing Hydra overrides."""
    p = sub.add_parser(name, help=help_, description=help_, epilog=examples or None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    p.add_argument("--config-dir", help="the conf/ directory (default: $QUANTMILL_CONF or ./conf)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's and the tools' logs")
    if overrides:
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=[gguf_q8_0] store.root=/data")
    return p


def compose(args: argparse.Namespace):
    """The typed config of ``conf/`` and the command's overrides."""
    from quantmill.config import compose as compose_config

    return compose_config(args.overrides, conf_dir=args.config_dir)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, ensure_ascii=False))
