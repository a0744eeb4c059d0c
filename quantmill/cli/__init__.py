"""The ``quantmill`` command: a dispatcher over one module per command group, each owning its parsers.

    quantmill run | plan              quantmill.cli.run
    quantmill quantize | recipes | targets               quantmill.cli.quantize
    quantmill ls | show | verify | report | registry ...   quantmill.cli.registry
    quantmill server | worker | deploy                    quantmill.cli.pools
    quantmill batch | watch | trigger                     quantmill.cli.batches
    quantmill store check                                 quantmill.cli.store

Hydra overrides may come before or after a command's options. A user's error is one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from quantmill import __version__
from quantmill.errors import QuantmillError

GROUPS = ("run", "quantize", "registry", "pools", "batches", "store")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (help, version) and one parser per command (``registry ls`` for subcommands)."""
    parser = argparse.ArgumentParser(prog="quantmill", description="A declarative factory for quantized LLMs.")
    parser.add_argument("--version", action="version", version=f"quantmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}
    for group in GROUPS:
        commands.update(importlib.import_module(f"quantmill.cli.{group}").configure_parser(sub))
    _add_examples(parser)
    return parser, commands


def _add_examples(parser: argparse.ArgumentParser) -> None:
    """Every command's --help ends with examples: its own, else those of ``common.EXAMPLES``."""
    from quantmill.cli.common import examples_for

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not sub.epilog:
                    sub.epilog = examples_for(sub.prog) or None
                    sub.formatter_class = argparse.RawDescriptionHelpFormatter
                _add_examples(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if argv[:1] in (["registry"], ["store"]) and f"{argv[0]} {argv[1:2][0] if argv[1:] else ''}" in commands:
        args = commands[f"{argv[0]} {argv[1]}"].parse_intermixed_args(argv[2:])
        args.registry_command = argv[1]
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
    except BrokenPipeError:  # `quantmill ls | head`: the reader left; say nothing more to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
