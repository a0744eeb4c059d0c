"""Registry publishers: ``local`` (the registry folder inside the local store) and ``s3`` (the same layout in a
bucket, shared by a team). Both sign the provenance record when a signing key is configured, keep the lineage,
and rewrite the catalogue page after each new version. Publishing the same artifact again changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from quantmill import constants as C
from quantmill.backends import PUBLISHERS
from quantmill.errors import PreflightError
from quantmill.registry.entries import ArtifactRegistry, copy_artifact, lineage
from quantmill.registry.locations import LocalLocation, S3Location
from quantmill.registry.names import check_name
from quantmill.store.local import ArtifactRef, LocalStore, Store

__all__ = ["check_name", "LocalRegistry", "LocalPublisher", "S3Publisher", "configured_registry", "record_bytes"]


class LocalRegistry(ArtifactRegistry):
    """The registry folder ``root`` (``<store>/registry``) of the local store ``root.parent``."""

    def __init__(self, root: Path):
        super().__init__(LocalLocation(root), LocalStore(Path(root).parent))


def configured_registry(publish: Any, cache_dir: str, store: Store | None) -> ArtifactRegistry | None:
    """The team registry that ``publish`` (the config's publish section) names, or None for a publisher that keeps
    no versioned registry (the Hub). ``store`` is the run's: a local registry lives inside it."""
    import dataclasses

    publisher = PUBLISHERS.get(publish.publisher)
    if not hasattr(publisher, "registry"):
        return None
    return publisher.registry({**dataclasses.asdict(publish), "cache_dir": cache_dir}, store)


def record_bytes(statement: Mapping[str, Any]) -> bytes:
    """A provenance record as published and signed: sorted keys, one space of indent, a final newline."""
    return (json.dumps(statement, indent=1, sort_keys=True) + "\n").encode()


class RegistryPublisher:
    """What local and S3 registries share: entry, card, signed record, lineage, catalogue page."""

    key = ""

    def destination(self, publish: Any) -> str:
        raise NotImplementedError

    def registry(self, publish: Mapping[str, Any], store: Store) -> ArtifactRegistry:
        raise NotImplementedError

    def check(self, publish: Any, store: Store) -> None:
        """Preflight: what this publisher needs from the config and the store (one line each)."""

    def publish(self, spec, store: Store, ref: ArtifactRef) -> dict[str, Any]:
        from quantmill.registry.catalogue import write_catalogue
        from quantmill.store import provenance, signing

        settings = spec.context["publish"]
        registry = self.registry(settings, store)
        result = store.read_result(ref)
        artifact = ArtifactRef(result["artifact"]["key"], result["artifact"]["digest"], "")
        existing = registry.find(result["name"], artifact.digest, result.get("validated", False))
        if existing:
            return existing
        if registry.store is not store:
            copy_artifact(store, registry.store, artifact)
        record = record_bytes(store.statement(artifact.key))
        signer = signing.signer_from(settings.get("signing_key"))
        entry = {**{k: v for k, v in result.items() if k != "name"}, "publish_key": ref.key,
                 "published_at": _now(), "signed_by": signing.key_id(signer) if signer else None,
                 "made_with": made_with(store.statement(artifact.key), result.get("recipe"))}
        card = store.read_file(ref, C.MODEL_CARD_FILE).decode()
        page = None
        if any(s.path == C.REPORT_PAGE_FILE for s in provenance.subjects_of(store.statement(ref.key))):
            page = store.read_file(ref, C.REPORT_PAGE_FILE)
        published = registry.publish(result["name"], entry, card, provenance=record,
                                     signature=signing.sign(record, signer) if signer else None,
                                     lineage=lineage(store, artifact.key), report=page)
        if settings.get("catalogue", True):
            write_catalogue(registry)
        return published

    def is_published(self, spec, store: Store, ref: ArtifactRef) -> bool:

        record = store.read_result(ref)
        return self.registry(spec.context["publish"], store).find(record["name"], record["artifact"]["digest"],
                                                                  record.get("validated", False)) is not None


def made_with(statement: Mapping[str, Any], recipe: str | None) -> dict[str, Any]:
    """Which settings made the artifact: its step's config as recorded (secrets redacted) and that config's digest,
    so that two versions of a name show whether the same settings made them."""
    from quantmill.digest import canonical_json, sha256_bytes

    config = statement["predicate"]["buildDefinition"]["externalParameters"].get("config", {})
    return {"recipe": recipe, "step": statement["predicate"]["buildDefinition"]["externalParameters"].get("spec"),
            "config_digest": sha256_bytes(canonical_json(config)).removeprefix("sha256:"), "config": config}


def _now() -> str:
    from quantmill.store import provenance

    return provenance.now()


class LocalPublisher(RegistryPublisher):
    key = "local"

    def destination(self, publish: Any) -> str:
        return "local"

    def registry(self, publish: Mapping[str, Any] | None, store: Store) -> ArtifactRegistry:
        return ArtifactRegistry(LocalLocation(store.root / C.REGISTRY_DIR), store)

    def check(self, publish: Any, store: Store) -> None:
        if not isinstance(store, LocalStore):
            raise PreflightError("publish.publisher=local writes the registry inside a local store; with an S3 store "
                                 "publish to the team's bucket (publish=s3) or set publish.enabled=false")


class S3Publisher(RegistryPublisher):
    """The team registry in a bucket: ``<bucket>/<prefix>/registry/...`` and the artifacts beside it as an S3 store."""

    key = "s3"

    def destination(self, publish: Any) -> str:
        return f"s3://{_get(publish, 'bucket')}/{_get(publish, 'prefix').strip('/')}"

    def registry(self, publish: Mapping[str, Any], store: Store | None = None) -> ArtifactRegistry:
        from quantmill.store.s3 import S3Store

        target = S3Store(publish["bucket"], publish["prefix"], endpoint_url=publish.get("endpoint_url"),
                         region=publish.get("region"), cache_dir=publish.get("cache_dir") or ".quantmill/s3-cache")
        if store is not None and getattr(store, "uri", None) == target.uri:
            target = store  # the run's store is the registry's bucket: the artifact is there already
        prefix = "/".join(p for p in (publish["prefix"].strip("/"), C.REGISTRY_DIR) if p)
        return ArtifactRegistry(S3Location(target.client, publish["bucket"], prefix), target)

    def check(self, publish: Any, store: Store) -> None:
        if not _get(publish, "bucket"):
            raise PreflightError("publish.publisher=s3 needs publish.bucket (and publish.endpoint_url for MinIO, R2 "
                                 "or a local S3 server)")
        from quantmill.store.s3 import check_bucket

        # A dead endpoint or missing credentials fail here, not after every step before publish has run.
        check_bucket(_get(publish, "bucket"), _get(publish, "endpoint_url"), _get(publish, "region"), "publish")


def _get(publish: Any, name: str) -> Any:
    return publish.get(name) if isinstance(publish, Mapping) else getattr(publish, name)


PUBLISHERS.register(LocalPublisher.key)(LocalPublisher())
PUBLISHERS.register(S3Publisher.key)(S3Publisher())
