"""One Prefect task per step. Each adds retries where they help, and passes references, never weights.

Prefect's own result caching is off: the content-addressed store is the cache, shared by every runner. The tasks
carry no tags: a tagged task asks the server for tag concurrency slots before it starts, a wait on every task;
pools' worker limits are what bounds concurrency here.
"""

from __future__ import annotations

from typing import Mapping

from prefect import task
from prefect.cache_policies import NO_CACHE

from quantmill import constants as C
from quantmill.config import StoreConfig
from quantmill.errors import ConfigError, IntegrityError, ModelSourceError, PreflightError, PublishRefused
from quantmill.execute import StepResult, run_step
from quantmill.plan.spec import StepSpec
from quantmill.prefect.workers import current_run, worker_store
from quantmill.store import open_store


def _run(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    inputs = {name: result.ref for name, result in upstream.items()}
    return run_step(spec, inputs, open_store(worker_store(store)), current_run())


_common = dict(cache_policy=NO_CACHE, task_run_name="{spec.id}", persist_result=False)


def _worth_retrying(task, task_run, state) -> bool:
    """A network hiccup is worth another try; a broken checkpoint, a refused setting or a failed gate is not."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, (ConfigError, PreflightError, ModelSourceError, IntegrityError, PublishRefused))


@task(name=C.DOWNLOAD, retries=2, retry_delay_seconds=5, retry_condition_fn=_worth_retrying, **_common)
def download(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


@task(name=C.MERGE, **_common)
def merge(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


@task(name=C.CALIBRATE, **_common)
def calibrate(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


@task(name=C.CONVERT, **_common)
def convert(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


@task(name=C.QUANTIZE, **_common)
def quantize(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


@task(name=C.VALIDATE, **_common)
def validate(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


@task(name=C.PUBLISH, retries=1, retry_delay_seconds=2, retry_condition_fn=_worth_retrying, **_common)
def publish(spec: StepSpec, upstream: Mapping[str, StepResult], store: StoreConfig) -> StepResult:
    return _run(spec, upstream, store)


TASKS = {C.DOWNLOAD: download, C.MERGE: merge, C.CALIBRATE: calibrate, C.CONVERT: convert, C.QUANTIZE: quantize,
         C.VALIDATE: validate, C.PUBLISH: publish}
