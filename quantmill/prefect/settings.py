"""Process settings for Prefect, applied before Prefect is imported: PREFECT_HOME, telemetry, logging, and flow
runs without heartbeats."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from quantmill import constants as C
from quantmill.config import InfraConfig
from quantmill.errors import QuantmillError


class ServerError(QuantmillError):
    """The Prefect server cannot be reached or lacks what a pools run needs."""


def configure_embedded(infra: InfraConfig, *, verbose: bool = False) -> None:
    """Settings for an embedded run (the flow runs in this process), applied before Prefect is imported.

    A project-local PREFECT_HOME keeps runs of different projects apart; telemetry is off (offline machines
    log lock errors from it). Without PREFECT_API_URL Prefect starts a temporary API server for the run
    (seconds; longer on a fresh PREFECT_HOME, whose database it migrates first); with PREFECT_API_URL pointing at a running server, the run is
    recorded there and that start-up is skipped.
    """
    home = Path(infra.prefect_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)
    quiet(verbose)


# Prefect waits 20 s for its temporary API server by default, counting only its own sleeps; on a fresh PREFECT_HOME
# the server first migrates its SQLite database, which on a loaded small machine takes longer. A user's own setting
# wins.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def prefect_defaults() -> None:
    """Settings read once when Prefect is imported: set them before that (Prefect freezes them at import)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)


def quiet(verbose: bool) -> None:
    prefect_defaults()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")


@contextmanager
def temporary_server_errors(infra: InfraConfig) -> Iterator[None]:
    """Prefect's temporary API server that does not start becomes one line that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        raise ServerError(
            f"Prefect's temporary API server (PREFECT_HOME {Path(infra.prefect_home).expanduser().resolve()}) did not "
            f"answer within {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s; raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with `quantmill server` and set "
            "PREFECT_API_URL") from None


@contextmanager
def without_run_heartbeats() -> Iterator[None]:
    """Flow runs started inside send no flow-run heartbeats.

    Prefect 3.8 sends one every 180 s from a thread that takes up to a second to stop when the run ends, so every
    run would wait for it. Liveness is checked otherwise here: a step run's by its worker's heartbeat
    (``wait_for_run``); an embedded or parent run is the process that started it.
    """
    import prefect.context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    # What ``temporary_settings`` does, with the settings copy made once per base settings: each copy builds
    # Prefect's whole settings model again, twice per parent run on pools.
    context = prefect.context.get_settings_context()
    quiet = _QUIET.of(context.settings, lambda s: s.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
    with prefect.context.SettingsContext(profile=context.profile, settings=quiet):
        yield




class _QuietSettings:
    """A settings object's copy without heartbeats, made once per base settings object."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[int, tuple[Any, Any]] = {}

    def of(self, base: Any, make) -> Any:
        with self._lock:
            held, copy = self._copies.get(id(base), (None, None))
            if held is not base:
                copy = make(base)
                if len(self._copies) >= 8:
                    self._copies.clear()
                self._copies[id(base)] = (base, copy)  # holding the base keeps its id unique
            return copy


_QUIET = _QuietSettings()


class _UserErrorsInOneLine(logging.Filter):
    """Drop Prefect's report of a task or flow that failed with a QuantmillError (a traceback, then the same message
    again): the error is a person's to read, and the run's summary gives it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, QuantmillError):
            return False
        message = record.getMessage()
        if message.startswith("Crash detected! Execution was aborted by a termination signal"):
            return False  # a signal quantmill reports itself, in one line (toolchain.interrupts)
        if message.startswith("Finished in state NotReady(\"Upstream task run"):
            return False  # a step skipped because an input failed: the summary says so beside the failed input
        return not any(f"exception {name}:" in message for name in _user_error_names())


def _user_error_names() -> set[str]:
    names, todo = set(), [QuantmillError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def user_errors_in_one_line(verbose: bool) -> None:
    """Keep tracebacks of user errors out of the terminal (``--verbose`` or QUANTMILL_DEBUG=1 keeps them)."""
    if verbose or os.environ.get(C.ENV_DEBUG) == "1":
        return
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorsInOneLine) for f in logger.filters):
            logger.addFilter(_UserErrorsInOneLine())
    for name in ("EventsWorker", "APILogWorker"):  # "still processing items" while flushing at exit: not news
        logging.getLogger(name).setLevel(logging.ERROR)
