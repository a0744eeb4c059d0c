"""A lease on one artifact key in a bucket, so that two workers never compute the same step at once.

The lease is an object written only if absent (``If-None-Match: *``), renewed by its holder with ``If-Match`` on
the ETag it last wrote, and deleted when the step ends. A holder that died stops renewing; once the bucket's own
clock (the ``Date`` of a read against the object's ``Last-Modified``) says the lease is older than its term, a
waiting worker takes it over with ``If-Match``, so exactly one of several waiters wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterator

TERM_SECONDS = 60.0  # a lease not renewed for this long belongs to a dead worker
POLL_SECONDS = 1.0  # a bucket has no notifications to wait on; a waiter reads the lease this often
CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _code(e: Exception) -> str | None:
    return getattr(e, "response", {}).get("Error", {}).get("Code")


@contextmanager
def lease(client: Any, bucket: str, key: str, *, done: Callable[[], bool], term: float = TERM_SECONDS,
          poll: float = POLL_SECONDS) -> Iterator[None]:
    """Hold the lease on ``key`` (an S3 object key) while inside; wait while another live worker holds it.

    ``done()`` says whether what the lease guards has appeared meanwhile (the artifact was committed by the
    holder): then the block runs without the lease and finds the artifact.
    """
    from botocore.exceptions import ClientError

    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}).encode()
    wake = threading.Event()
    etag = None
    while etag is None:
        try:
            etag = client.put_object(Bucket=bucket, Key=key, Body=owner, IfNoneMatch="*")["ETag"]
            break
        except ClientError as e:
            if _code(e) not in CONFLICT:
                raise
        if done():
            yield
            return
        try:
            held = client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                continue  # released meanwhile: try again at once
            raise
        now = parsedate_to_datetime(held["ResponseMetadata"]["HTTPHeaders"]["date"])
        if (now - held["LastModified"]).total_seconds() > term:  # its holder stopped renewing: take it over
            try:
                etag = client.put_object(Bucket=bucket, Key=key, Body=owner, IfMatch=held["ETag"])["ETag"]
                break
            except ClientError as e:
                if _code(e) not in CONFLICT and _code(e) not in ("404", "NoSuchKey"):
                    raise
                continue
        wake.wait(poll)

    stop = threading.Event()
    current = {"etag": etag}

    def renew() -> None:
        while not stop.wait(max(term / 3, poll)):
            try:
                current["etag"] = client.put_object(Bucket=bucket, Key=key, Body=owner,
                                                    IfMatch=current["etag"])["ETag"]
            except ClientError:
                return  # taken over (this worker was presumed dead) or gone: the commit stays conditional

    renewer = threading.Thread(target=renew, name="quantmill-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:  # only the lease this worker still holds
            client.delete_object(Bucket=bucket, Key=key, IfMatch=current["etag"])
        except ClientError:
            pass
