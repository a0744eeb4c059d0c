"""What every command shares: the options every command takes, the composed config of its overrides, and the team
registry that config names."""

from __future__ import annotations

import argparse
import json
from typing import Any

# Examples for commands whose module gives none, keyed by the command's prog; every --help ends with some.
EXAMPLES = {
    "quantmill ls": ["quantmill ls", "quantmill ls --json | jq '.[].name'"],
    "quantmill recommend": ["quantmill recommend tiny-llama --target rtx2060_12gb",
                            "quantmill recommend tiny-llama --target cpu_32gb --domain code --json"],
    "quantmill show": ["quantmill show tiny-llama-gguf_q4_k_m", "quantmill show tiny-llama-gguf_q4_k_m --version 1"],
    "quantmill report": ["quantmill report", "quantmill report --model tiny-llama --json"],
    "quantmill verify": ["quantmill verify tiny-llama-gguf_q4_k_m", "quantmill verify ./tiny-llama-gguf_q4_k_m"],
    "quantmill registry": ["quantmill registry ls --max-kld 0.05", "quantmill registry pull NAME --to ./NAME",
                           "quantmill registry ls publish=s3 publish.bucket=team-models"],
    "quantmill registry ls": ["quantmill registry ls --format gguf --bits 4", "quantmill registry ls --fits "
                              "rtx4090_24gb --max-ppl-ratio 1.03", "quantmill registry ls --versions",
                              "quantmill registry ls --domain code --max-kld 0.05"],
    "quantmill registry show": ["quantmill registry show tiny-llama-gguf_q4_k_m:stable"],
    "quantmill registry lineage": ["quantmill registry lineage tiny-llama-gguf_q4_k_m"],
    "quantmill registry pull": ["quantmill registry pull tiny-llama-gguf_q4_k_m --to ./q4",
                                "quantmill registry pull NAME:v2 --key keys/team.pub.json --require-signature"],
    "quantmill registry verify": ["quantmill registry verify ./q4 --key keys/team.pub.json"],
    "quantmill registry promote": ["quantmill registry promote tiny-llama-gguf_q4_k_m --tag stable --version 2"],
    "quantmill registry gc": ["quantmill registry gc --dry-run", "quantmill registry gc --keep-days 30"],
    "quantmill registry keygen": ["quantmill registry keygen --out keys --name team"],
    "quantmill registry catalogue": ["quantmill registry catalogue publish=s3 publish.bucket=team-models"],
    "quantmill deploy": ["quantmill deploy", "quantmill deploy infra=prefect"],
    "quantmill store": ["quantmill store check", "quantmill store check --repair"],
}


def examples_for(prog: str) -> str:
    lines = EXAMPLES.get(prog, [])
    return "examples:\n" + "".join(f"  {line}\n" for line in lines) if lines else ""


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


def team_registry(args: argparse.Namespace):
    """(the registry's store, the registry) of the configured publisher (``publish=s3 publish.bucket=...``)."""
    from quantmill.backends import PUBLISHERS
    from quantmill.backends.local_publisher import configured_registry
    from quantmill.errors import ConfigError
    from quantmill.store import open_store

    cfg = compose(args)
    args.publish_config = cfg.publish
    publisher = PUBLISHERS.get(cfg.publish.publisher)
    if not hasattr(publisher, "registry"):  # only registry publishers keep the versioned layout listed here
        raise ConfigError(f"publish.publisher={cfg.publish.publisher!r} cannot be listed; the team registry is "
                          f"publish=local or publish=s3")
    if cfg.publish.publisher == "local" and cfg.store.kind == "local":
        from pathlib import Path

        root = Path(cfg.store.root).expanduser().resolve()
        if not (root / "objects").is_dir():  # a mistyped store.root must not become a new, empty store
            raise ConfigError(f"store.root {root} holds no store yet; fix store.root, or run the pipeline first")
    store = open_store(cfg.store) if cfg.publish.publisher == "local" else None  # a bucket registry needs no local store
    if store is None:
        publisher.check(cfg.publish, store)
    registry = configured_registry(cfg.publish, cfg.store.cache_dir, store)
    return registry.store, registry
