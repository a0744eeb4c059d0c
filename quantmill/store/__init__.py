"""The content-addressed store (a local directory or a bucket), its provenance records and their signatures."""

from __future__ import annotations

from quantmill.config import StoreConfig
from quantmill.errors import PreflightError
from quantmill.store.local import ArtifactRef, LocalStore, Store

__all__ = ["ArtifactRef", "LocalStore", "Store", "open_store"]


def open_store(store: StoreConfig) -> Store:
    """The store a store config names: a local directory, or a bucket (S3, MinIO, R2)."""
    if store.kind == "local":
        return LocalStore(store.root, quota_bytes=store.quota_bytes)
    if store.kind == "s3":
        if not store.bucket:
            raise PreflightError("store.kind=s3 needs store.bucket (and store.endpoint_url for MinIO, R2 or a "
                                 "local S3 server)")
        from quantmill.store.s3 import S3Store

        return S3Store(store.bucket, store.prefix, endpoint_url=store.endpoint_url, region=store.region,
                       cache_dir=store.cache_dir)
    raise PreflightError(f"store.kind {store.kind!r} unknown; known: local, s3")
