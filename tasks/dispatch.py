"""The task that sends a segment of same-pool steps to its pool and waits for the step run to end."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from quantmill.prefect.scheduler import dispatch_segment

# A retry (the server was busy) finds the step run its first attempt made: the idempotency key is the same.
dispatch = task(dispatch_segment, name="dispatch", task_run_name="{pool}: {label}", cache_policy=NO_CACHE,
                persist_result=False, retries=3, retry_delay_seconds=3)
