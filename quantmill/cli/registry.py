"""The team registry: ``ls``, ``show``, ``verify``, ``report`` and the ``registry`` subcommands (search, lineage,
pull, verify, promote, gc, keygen, catalogue), over the configured publisher's registry (``publish=local`` or
``publish=s3 publish.bucket=...``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from quantmill.cli.common import add_command, compose, team_registry
from quantmill.cli.recommend import cmd_recommend


def configure_parser(sub) -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    p = parsers["ls"] = add_command(sub, "ls", cmd_ls, "list published artifacts")
    p.add_argument("--json", action="store_true")
    p = parsers["show"] = add_command(sub, "show", cmd_show, "show a published artifact: model card, files, provenance",
                                      overrides=False)
    p.add_argument("name")
    p.add_argument("--version", type=int, dest="version", default=None, help="a version number (default: latest)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    p = parsers["report"] = add_command(sub, "report", cmd_report, "the validation report of a model: metrics of "
                                        "every artifact, and its HTML page", overrides=False)
    p.add_argument("--model", help="model name (default: the configured model's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    p = parsers["verify"] = add_command(sub, "verify", cmd_verify, "re-hash a published artifact (NAME) or an "
                                        "artifact key against its provenance", overrides=False)
    p.add_argument("target")
    p.add_argument("overrides", nargs="*")
    p = parsers["recommend"] = add_command(sub, "recommend", cmd_recommend, "which published artifact of MODEL to "
                                           "run on a target, from measured quality, size, speed and energy",
                                           overrides=False)
    p.add_argument("model")
    p.add_argument("--target", required=True, help="a conf/target profile (quantmill targets lists them)")
    p.add_argument("--domain", help="rank by this domain's measured KLD (code, math, ...) instead of prose")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    for name, q in _registry_parser(sub).items():
        parsers[f"registry {name}"] = q
    return parsers


def cmd_ls(args: argparse.Namespace) -> int:
    _, registry = team_registry(args)
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

    store, registry = team_registry(args)
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
    from quantmill.cli import ui
    from quantmill.errors import NotFound
    from quantmill.evaluation import report
    from quantmill.store import open_store

    cfg = compose(args)
    store = open_store(cfg.store)
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
    store, registry = team_registry(args)
    key = args.target
    if not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
        key = registry.get(args.target)["artifact"]["key"]
    problems = store.verify(key)
    for p in problems:
        print(f"{args.target}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.target}: verified ({len(store.statement(key)['subject'])} files)")
    return 0 if not problems else 1


def cmd_registry(args: argparse.Namespace) -> int:
    return REGISTRY_COMMANDS[args.registry_command](args)


def _keys(args: argparse.Namespace) -> list:
    from quantmill.registry.operations import keys_for

    return keys_for(args.publish_config, list(getattr(args, "key", None) or []))


def reg_ls(args: argparse.Namespace) -> int:
    from quantmill.registry.operations import Filters, search

    _, registry = team_registry(args)
    target = None
    if args.fits:
        from quantmill.config import compose

        target = compose([f"target={args.fits}", "recipe=[gguf_q8_0]"], conf_dir=args.config_dir).target
    return _print_entries(args, search(registry, Filters(
        model=args.model, format=args.format, bits=args.bits, max_kld=args.max_kld, max_ppl_ratio=args.max_ppl_ratio,
        fits=target, tag=args.tag, domain=args.domain), every_version=args.versions))


def reg_show(args: argparse.Namespace) -> int:
    from quantmill.cli import ui
    from quantmill.registry.names import PROVENANCE

    _, registry = team_registry(args)
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

    _, registry = team_registry(args)
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

    _, registry = team_registry(args)
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
        args.publish_config = compose(args).publish
        problems = verify_path(path, _keys(args), require_signature=args.require_signature)
    else:
        _, registry = team_registry(args)
        problems = verify_name(registry, args.target, _keys(args), require_signature=args.require_signature)
    for p in problems:
        print(f"{args.target}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.target}: verified")
    return 0 if not problems else 1


def reg_promote(args: argparse.Namespace) -> int:
    _, registry = team_registry(args)
    v = registry.promote(args.name, args.tag, args.version)
    print(f"{args.name.split(':')[0]}:{args.tag} -> v{v}")
    return 0


def reg_gc(args: argparse.Namespace) -> int:
    from quantmill.registry.operations import gc_apply, gc_plan

    _, registry = team_registry(args)
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

    _, registry = team_registry(args)
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
        q = parsers[name] = add_command(rs, name, cmd_registry, help_, overrides=False)
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
    q.add_argument("--domain", help="--max-kld and --max-ppl-ratio read this domain's metrics (code, math, ...); "
                   "artifacts not measured on it are left out")
    q.add_argument("--versions", action="store_true", help="every version, with the recipe and settings digest that "
                   "made it (default: the latest of each name)")
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


