"""The library's one contact with Prefect: process settings for embedded runs, and run ids for provenance."""

from __future__ import annotations

import os
from pathlib import Path

from quantmill.config import InfraConfig
from quantmill.provenance import RunInfo


def configure_embedded(infra: InfraConfig, *, verbose: bool = False) -> None:
    """Settings for an embedded run (the flow runs in this process), applied before Prefect is imported.

    A project-local PREFECT_HOME keeps runs of different projects apart; telemetry is off (offline machines
    log lock errors from it). Without PREFECT_API_URL Prefect starts a temporary API server for the run
    (about 6 s, 11 s on a fresh PREFECT_HOME); with PREFECT_API_URL pointing at a running server, the run is
    recorded there and that start-up is skipped.
    """
    home = Path(infra.prefect_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")


def current_run() -> RunInfo:
    """The Prefect flow and task run ids of the caller (None outside Prefect)."""
    from prefect.runtime import flow_run, task_run

    return RunInfo(flow_run_id=_id(flow_run.get_id()), task_run_id=_id(task_run.get_id()))


def _id(value) -> str | None:
    return str(value) if value else None
