"""Provenance records: an in-toto Statement v1 whose predicate is SLSA Provenance v1, one per artifact.

The statement lists every file of the artifact as a subject (name + sha256), the step's resolved config as its
external parameters, inputs and tools as resolved dependencies, and where, when and by which run it was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from quantmill import __version__
from quantmill import constants as C
from quantmill.digest import FileDigest, sha256_files
from quantmill.toolchain import hardware

# A key names a secret when one of its words does (``hf_token``, ``aws_secret_access_key``, ``apiKey``); a word that
# only contains one does not (``max_tokens``, ``tokenizer``).
SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials", "apikey"})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
REDACTED = "<redacted>"


def names_a_secret(key: str) -> bool:
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    return bool(SECRET_WORDS.intersection(words)) or any(pair in SECRET_PAIRS for pair in zip(words, words[1:]))


@dataclass(frozen=True)
class RunInfo:
    """Where and by which orchestrator run a step executed; filled by the task layer."""

    builder_id: str = C.BUILDER_ID_EMBEDDED
    flow_run_id: str | None = None
    task_run_id: str | None = None
    pool: str | None = None
    worker: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def redact(value: Any) -> Any:
    """Copy of ``value`` with every mapping entry whose key looks like a secret replaced by ``<redacted>``."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if names_a_secret(str(k)) and v is not None else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def statement(*, subjects: list[FileDigest], artifact_digest: str, key: str, step: str, spec_id: str,
              impl_version: str, config: Mapping[str, Any], inputs: Mapping[str, Mapping[str, str]],
              dependencies: list[Mapping[str, Any]], tools: Mapping[str, str], run: RunInfo,
              started: str, finished: str) -> dict[str, Any]:
    """Build the statement for one artifact. ``inputs`` maps input name to {key, digest, uri}."""
    resolved = [
        {"name": f"input:{name}", "uri": ref["uri"], "digest": {"sha256": ref["digest"].removeprefix("sha256:")},
         "annotations": {"key": ref["key"]}}
        for name, ref in sorted(inputs.items())
    ]
    resolved += [dict(d) for d in dependencies]
    resolved += [{"name": f"tool:{name}", "annotations": {"version": version}} for name, version in sorted(tools.items())]
    run_annotations = {**hardware.host_info(), **{k: v for k, v in {
        "prefect_flow_run_id": run.flow_run_id, "prefect_task_run_id": run.task_run_id,
        "pool": run.pool, "worker": run.worker}.items() if v}, **dict(run.extra)}
    return {
        "_type": C.INTOTO_STATEMENT_TYPE,
        "subject": [{"name": f.path, "digest": {"sha256": f.sha256}, "annotations": {"size": f.size}}
                    for f in subjects],
        "predicateType": C.SLSA_PROVENANCE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": C.BUILD_TYPE,
                "externalParameters": {"step": step, "spec": spec_id, "config": redact(dict(config))},
                "internalParameters": {"implementation_version": impl_version, "cache_key": key},
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": run.builder_id, "version": {"quantmill": __version__}},
                "metadata": {"invocationId": run.task_run_id or key, "startedOn": started, "finishedOn": finished},
                "byproducts": [
                    {"name": "artifact", "uri": f"quantmill:{key}",
                     "digest": {"sha256": artifact_digest.removeprefix("sha256:")}},
                    {"name": "run", "annotations": run_annotations},
                ],
            },
        },
    }


def artifact_digest_of(stmt: Mapping[str, Any]) -> str:
    for item in stmt["predicate"]["runDetails"]["byproducts"]:
        if item["name"] == "artifact":
            return "sha256:" + item["digest"]["sha256"]
    raise KeyError("statement has no artifact byproduct")


def run_of(stmt: Mapping[str, Any]) -> dict[str, str]:
    """The run annotations (host, Prefect run ids, pool, worker) of a statement."""
    for item in stmt["predicate"]["runDetails"]["byproducts"]:
        if item["name"] == "run":
            return dict(item.get("annotations", {}))
    return {}


def seconds_of(stmt: Mapping[str, Any]) -> float:
    """How long the step function ran (startedOn to finishedOn)."""
    meta = stmt["predicate"]["runDetails"]["metadata"]
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(meta["finishedOn"]) - parse(meta["startedOn"])).total_seconds()


def subjects_of(stmt: Mapping[str, Any]) -> list[FileDigest]:
    return [FileDigest(s["name"], s["digest"]["sha256"], s["annotations"]["size"]) for s in stmt["subject"]]


def user_subjects_of(stmt: Mapping[str, Any]) -> list[FileDigest]:
    """The files a user loads: every subject but the pipeline's own check files (``C.INTERNAL_FILES``)."""
    from quantmill import constants as C

    return [s for s in subjects_of(stmt) if s.path not in C.INTERNAL_FILES]


def verify(stmt: Mapping[str, Any], files_dir: Path) -> list[str]:
    """Check every subject against the files on disk; return one line per problem (empty: verified)."""
    from quantmill.digest import digest_tree, manifest_digest

    problems = []
    if stmt.get("_type") != C.INTOTO_STATEMENT_TYPE or stmt.get("predicateType") != C.SLSA_PROVENANCE_TYPE:
        problems.append("not an in-toto v1 statement with a SLSA v1 predicate")
    subjects = subjects_of(stmt)
    on_disk = {f.path for f in digest_tree(files_dir, hasher=lambda p: "")}
    present = [s for s in subjects if (files_dir / s.path).is_file()]
    actual = dict(zip((s.path for s in present), sha256_files([files_dir / s.path for s in present])))
    for s in subjects:
        if s.path not in actual:
            problems.append(f"{s.path}: missing")
        elif actual[s.path] != s.sha256:
            problems.append(f"{s.path}: sha256 {actual[s.path]} != recorded {s.sha256}")
    for extra in sorted(on_disk - {s.path for s in subjects}):
        problems.append(f"{extra}: not in the provenance record")
    if manifest_digest(subjects) != artifact_digest_of(stmt):
        problems.append("artifact digest does not match the listed subjects")
    return problems
