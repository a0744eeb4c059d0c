"""The content-addressed store on any S3-compatible endpoint (AWS, MinIO, R2), through boto3.

Layout under ``s3://BUCKET/PREFIX/``: ``objects/<key>/files/<upload>/<path>`` for an artifact's files and
``objects/<key>/provenance.json``, uploaded last with a conditional write (``If-None-Match: *``): it is the commit
marker, so an artifact exists only once every file is up, and of two workers that computed the same key, the first
to commit wins and the second uses the winner's artifact. Each writer uploads under an ``<upload>`` id of its own,
which the marker names (object metadata ``files``), so a losing writer never overwrites the winner's files even
when its bytes differ (a validation record holds measured speeds). Downloads land in a worker-local cache keyed
by artifact key and are checked against their sha256 before any step reads them.

Credentials come from the environment or the worker (boto3's chain), never from conf/.
"""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

from quantmill import constants as C
from quantmill.digest import FileDigest, digest_tree, manifest_digest, sha256_file
from quantmill.errors import IntegrityError, NotFound, StoreError
from quantmill.store import provenance
from quantmill.store.local import ArtifactRef, Staging, Store
from quantmill.toolchain import interrupts


def explain_client_error(exc: Exception, bucket: str, endpoint: str | None, setting: str = "store") -> StoreError:
    """One line for the errors users hit: wrong credentials, missing bucket, unreachable endpoint."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"s3://{bucket} ({endpoint or 'AWS'})"
    if isinstance(exc, NoCredentialsError):
        return StoreError(f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile) "
                          f"in the worker's environment")
    if isinstance(exc, EndpointConnectionError):
        return StoreError(f"{where}: endpoint unreachable; check {setting}.endpoint_url")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StoreError(f"{where}: bucket {bucket!r} does not exist; create it or fix {setting}.bucket")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StoreError(f"{where}: credentials refused ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return StoreError(f"{where}: {code or type(exc).__name__}: {exc.response.get('Error', {}).get('Message', '')}")
    return StoreError(f"{where}: {type(exc).__name__}: {exc}")


def check_bucket(bucket: str, endpoint: str | None, region: str | None, setting: str) -> None:
    """One request before any work: the bucket exists and the credentials reach it; one line otherwise."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                          config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the bucket and the fix
        error = explain_client_error(e, bucket, endpoint, setting)
        if "Not Found" in str(error) or "404" in str(error):
            error = StoreError(f"s3://{bucket} ({endpoint or 'AWS'}): bucket {bucket!r} does not exist; create it or "
                               f"fix {setting}.bucket")
        raise error from None


SMALL_FILE_BYTES = 64 << 10  # files read whole (results, cards) up to this size are kept in memory once verified
SMALL_FILES_KEPT = 4096


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, cache_dir: str | Path = ".quantmill/s3-cache"):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20)
        self.cache = Path(cache_dir).expanduser().resolve()
        self._uploads: dict[str, str] = {}  # artifact key -> upload id of its committed files
        self._statements: dict[str, dict[str, Any]] = {}  # committed records never change: read each once
        self._small: dict[tuple[str, str, str], bytes] = {}  # (key, path, sha256) -> verified bytes of a small file
        for sub in (C.OBJECTS_DIR, C.STAGING_DIR, C.STATE_DIR):
            (self.cache / sub).mkdir(parents=True, exist_ok=True)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _file_key(self, key: str, path: str) -> str:
        """Where a committed artifact's file is: under the upload id its commit marker names."""
        if key not in self._uploads:
            self.statement(key)
        return self._key(C.OBJECTS_DIR, key, C.FILES_DIR, self._uploads[key], path)

    def file_path(self, key: str, path: str) -> str:
        """A committed file's place relative to the store's root (the catalogue page links to it)."""
        return self._file_key(key, path)[len(self.prefix) + 1:] if self.prefix else self._file_key(key, path)

    def _call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as e:  # one line for the user, the original kept as the cause
            from boto3.exceptions import S3UploadFailedError
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, ClientError):
                e = e.__context__  # boto3 wraps the service's answer
            if isinstance(e, (ClientError, BotoCoreError)):
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    raise
                raise explain_client_error(e, self.bucket, self.endpoint_url) from e
            raise

    # -- reading -----------------------------------------------------------------------------------------
    def statement(self, key: str) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        if key in self._statements:
            return self._statements[key]
        try:
            response = self._call(self.client.get_object, Bucket=self.bucket,
                                  Key=self._key(C.OBJECTS_DIR, key, C.PROVENANCE_FILE))
        except ClientError:
            raise NotFound(f"no artifact with key {key} in {self.uri}") from None
        self._uploads[key] = response.get("Metadata", {}).get("files", "")
        self._statements[key] = json.loads(response["Body"].read())
        return self._statements[key]

    def lookup(self, key: str) -> ArtifactRef | None:
        try:
            stmt = self.statement(key)
        except NotFound:
            return None
        return ArtifactRef(key, provenance.artifact_digest_of(stmt), f"{self.uri}/{C.OBJECTS_DIR}/{key}")

    def files(self, ref: ArtifactRef) -> Path:
        """The artifact's files in the local cache, downloaded if needed and verified file by file."""
        local = self.cache / C.OBJECTS_DIR / ref.key / C.FILES_DIR
        stmt = self.statement(ref.key)
        if provenance.artifact_digest_of(stmt) != ref.digest:
            raise IntegrityError(f"artifact {ref.key} in {self.uri}: digest differs from the expected {ref.digest}")
        cache = self.digest_cache()
        for subject in provenance.subjects_of(stmt):
            path = local / subject.path
            if path.is_file() and cache.sha256(path) == subject.sha256:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            self._call(self.client.download_file, Bucket=self.bucket,
                       Key=self._file_key(ref.key, subject.path), Filename=str(tmp),
                       Config=self.transfer)
            actual = sha256_file(tmp)
            if actual != subject.sha256:
                tmp.unlink()
                raise IntegrityError(f"artifact {ref.key} in {self.uri}: {subject.path} has sha256 {actual[:16]}…, "
                                     f"its provenance says {subject.sha256[:16]}…; the object was altered: not used")
            tmp.replace(path)
        cache.save()
        return local

    verified_files = files

    def read_file(self, ref: ArtifactRef, path: str) -> bytes:
        import hashlib

        stmt = self.statement(ref.key)
        subject = next((s for s in provenance.subjects_of(stmt) if s.path == path), None)
        if subject is None:
            raise NotFound(f"artifact {ref.key} in {self.uri} has no file {path}")
        kept = self._small.get((ref.key, path, subject.sha256))
        if kept is not None:  # verified when read: a batch reads its shared download's result once, not per run
            return kept
        body = self._call(self.client.get_object, Bucket=self.bucket, Key=self._file_key(ref.key, path))["Body"].read()
        if hashlib.sha256(body).hexdigest() != subject.sha256:
            raise IntegrityError(f"artifact {ref.key} in {self.uri}: {path} differs from its provenance; not used")
        if len(body) <= SMALL_FILE_BYTES:
            if len(self._small) >= SMALL_FILES_KEPT:
                self._small.clear()
            self._small[(ref.key, path, subject.sha256)] = body
        return body

    def verify(self, key: str) -> list[str]:
        ref = self.lookup(key)
        if ref is None:
            raise NotFound(f"no artifact with key {key} in {self.uri}")
        try:
            self.files(ref)
        except IntegrityError as e:
            return [str(e)]
        return []

    def state_dir(self) -> Path:
        return self.cache / C.STATE_DIR

    def fetch_file(self, key: str, path: str, dst: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(self.client.download_file, Bucket=self.bucket, Key=self._file_key(key, path), Filename=str(dst),
                       Config=self.transfer)
        except ClientError:
            raise NotFound(f"{self.uri}: artifact {key} has no object for {path}") from None

    def keys(self) -> list[str]:
        found = []
        base = self._key(C.OBJECTS_DIR) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                          Delimiter="/"):
            found += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(k for k in found if self.lookup(k) is not None)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(C.OBJECTS_DIR, key, C.PROVENANCE_FILE))
        self._statements.pop(key, None)
        base = self._key(C.OBJECTS_DIR, key) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])

    # -- writing -----------------------------------------------------------------------------------------
    def stage(self, key: str) -> Staging:
        root = self.cache / C.STAGING_DIR / f"{key[:16]}-{uuid.uuid4().hex[:8]}"
        (root / C.FILES_DIR).mkdir(parents=True)
        return Staging(self, key, root)  # type: ignore[arg-type]

    def full_error(self, exc: BaseException | None = None, need: int | None = None) -> StoreError:
        return StoreError(f"local staging for {self.uri} in {self.cache} is out of disk space; nothing was committed; "
                          f"free space or move the worker's cache")

    def key_lock(self, key: str) -> AbstractContextManager[None]:
        """A lease in the bucket (``s3_lease``): workers on other machines computing the same key wait for the
        holder's commit instead of computing it again; a dead holder's lease expires."""
        from quantmill.store.s3_lease import lease

        return lease(self.client, self.bucket, self._key(C.STATE_DIR, "leases", key),
                     done=lambda: self.lookup(key) is not None)

    def commit(self, staging: Staging, build_statement: Callable[[list[FileDigest], str], dict]) -> ArtifactRef:
        from botocore.exceptions import ClientError

        cache = self.digest_cache()
        subjects = digest_tree(staging.files, hasher=cache.sha256)
        cache.save()
        digest = manifest_digest(subjects)
        stmt = build_statement(subjects, digest)
        upload = uuid.uuid4().hex[:16]
        for subject in subjects:  # files first, under this writer's own upload id: invisible until the marker
            self._call(self.client.upload_file, Filename=str(staging.files / subject.path), Bucket=self.bucket,
                       Key=self._key(C.OBJECTS_DIR, staging.key, C.FILES_DIR, upload, subject.path),
                       Config=self.transfer)
        if interrupts.stopping():
            raise StoreError(f"{self.uri}: not committing {staging.key[:12]}: the run is being stopped")
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(C.OBJECTS_DIR, staging.key, C.PROVENANCE_FILE),
                                   Body=json.dumps(stmt, indent=1).encode(), IfNoneMatch="*",
                                   Metadata={"files": upload})
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise explain_client_error(e, self.bucket, self.endpoint_url) from e
            existing = self.lookup(staging.key)  # another worker committed this key first: keep theirs
            if existing is None:
                raise StoreError(f"{self.uri}: conditional commit of {staging.key} refused but no record found") from e
            return existing
        self._uploads[staging.key] = upload
        # the committed files are also the local cache's copy
        local = self.cache / C.OBJECTS_DIR / staging.key
        if not local.exists():
            local.mkdir(parents=True)
            shutil.move(str(staging.files), local / C.FILES_DIR)
        staging.committed = ArtifactRef(staging.key, digest, f"{self.uri}/{C.OBJECTS_DIR}/{staging.key}")
        return staging.committed
