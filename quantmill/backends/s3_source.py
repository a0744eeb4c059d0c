"""Models in a bucket: ``model.source=s3 model.path=s3://bucket/prefix`` (a Hugging Face-layout folder).

The model's identity is the manifest of its objects' ETags and sizes: any object replaced is a new revision (what
``quantmill watch`` compares), the same objects are the same key. Each file is downloaded with ``If-Match`` its
ETag as planned, so an object replaced between planning and download fails the run instead of mixing revisions.
The endpoint comes from the environment like the credentials (AWS_ENDPOINT_URL for MinIO, R2 or a local server).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from quantmill.backends import SOURCES
from quantmill.backends.base import SourceInfo
from quantmill.config import ModelConfig
from quantmill.digest import DigestCache, FileDigest, canonical_json, sha256_bytes
from quantmill.errors import ModelSourceError
from quantmill.toolchain.model_files import check_config, check_safetensors, select_files


def _split(cfg: ModelConfig) -> tuple[str, str]:
    path = cfg.path or ""
    if not path.startswith("s3://") or len(path) <= 5:
        raise ModelSourceError(f"model {cfg.name!r}: source 's3' needs model.path=s3://BUCKET/PREFIX (got {path!r})")
    bucket, _, prefix = path[5:].partition("/")
    return bucket, prefix.strip("/")


def _client():
    import boto3

    return boto3.client("s3")


def _explain(cfg: ModelConfig, exc: Exception) -> ModelSourceError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    return ModelSourceError(f"model {cfg.name!r}: {cfg.path}: {code}; check the bucket and prefix, AWS_ENDPOINT_URL "
                            f"and the credentials in the environment")


class S3Source:
    key = "s3"

    def _objects(self, cfg: ModelConfig) -> dict[str, dict[str, Any]]:
        """relative path -> {key, size, etag} of every object under the prefix."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = _split(cfg)
        base = f"{prefix}/" if prefix else ""
        objects = {}
        try:
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
                for o in page.get("Contents", []):
                    objects[o["Key"][len(base):]] = {"key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"')}
        except (ClientError, BotoCoreError) as e:
            raise _explain(cfg, e) from None
        if not objects:
            raise ModelSourceError(f"model {cfg.name!r}: no objects under {cfg.path}; fix model.path")
        return objects

    def _get(self, cfg: ModelConfig, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _ = _split(cfg)
        try:
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as e:
            raise _explain(cfg, e) from None

    def read_config(self, cfg: ModelConfig) -> dict[str, Any]:
        objects = self._objects(cfg)
        if "config.json" not in objects:
            raise ModelSourceError(f"model {cfg.name!r}: {cfg.path} has no config.json")
        return json.loads(self._get(cfg, objects["config.json"]["key"]))

    def describe(self, cfg: ModelConfig, cache: DigestCache) -> SourceInfo:
        objects = self._objects(cfg)
        chosen = select_files(cfg.name, list(objects), allow_pickle=cfg.allow_pickle,
                              trust_remote_code=cfg.trust_remote_code)
        if "config.json" not in objects:
            raise ModelSourceError(f"model {cfg.name!r}: {cfg.path} has no config.json")
        config = json.loads(self._get(cfg, objects["config.json"]["key"]))
        arch = check_config(cfg.name, config, trust_remote_code=cfg.trust_remote_code)
        manifest = {name: [objects[name]["etag"], objects[name]["size"]] for name in chosen}
        revision = sha256_bytes(canonical_json(manifest))
        files = [FileDigest(n, "", objects[n]["size"]) for n in chosen]
        return SourceInfo(source=self.key, identity={"uri": cfg.path.rstrip("/"), "objects": revision},
                          config=config, architecture=arch, files=files, uri=cfg.path.rstrip("/"),
                          base_model=cfg.name, license=config.get("license"),
                          extra={"etags": {n: objects[n]["etag"] for n in chosen},
                                 "keys": {n: objects[n]["key"] for n in chosen}})

    def download(self, cfg: ModelConfig, info: SourceInfo, out: Path,
                 on_bytes: Callable[[int], None] | None = None, *, link: bool = False) -> None:
        from botocore.exceptions import ClientError

        bucket, _ = _split(cfg)
        client = _client()
        for f in info.files:
            dst = out / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:  # exactly the object planned: a replaced one fails here instead of mixing two revisions
                body = client.get_object(Bucket=bucket, Key=info.extra["keys"][f.path],
                                         IfMatch=info.extra["etags"][f.path])["Body"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    raise ModelSourceError(f"model {cfg.name!r}: {cfg.path}/{f.path} was replaced after planning; "
                                           f"run again to build the new revision") from None
                raise _explain(cfg, e) from None
            with open(dst, "wb") as fo:
                while chunk := body.read(16 << 20):
                    fo.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
            if f.path.endswith(".safetensors"):
                check_safetensors(dst)

    def dependency(self, info: SourceInfo) -> dict[str, Any]:
        return {"name": "model", "uri": info.uri, "digest": {"sha256": info.identity["objects"].split(":")[-1]},
                "annotations": {"etags": info.extra["etags"]}}


SOURCES.register(S3Source.key)(S3Source())
