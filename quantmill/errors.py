"""Errors a user can act on. Each message is one line: the thing, the value, and the fix."""


class QuantmillError(Exception):
    """Base class: anything quantmill reports to a user without a traceback."""


class ConfigError(QuantmillError):
    """The composed configuration is invalid (unknown key, missing value, unknown name)."""


class PreflightError(QuantmillError):
    """A check before heavy work failed: the run would fail later, so it does not start."""


class ModelSourceError(QuantmillError):
    """The model cannot be fetched or its files are unusable."""


class StoreError(QuantmillError):
    """The artifact store cannot read or write an artifact."""


class StoreFullError(StoreError):
    """The store ran out of space (disk full or over its quota); nothing partial was kept."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded digest."""


class ToolError(QuantmillError):
    """An external tool (llama.cpp's converter, quantizer, ...) failed; ``returncode`` is negative when a signal
    ended it (a run being interrupted, the kernel's OOM killer): nothing about its input is known then."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


class ValidationFailed(QuantmillError):
    """An artifact failed a validation gate."""


class PublishRefused(QuantmillError):
    """Publishing was refused (the artifact failed validation, or the name is invalid)."""


class NotFound(QuantmillError):
    """A named thing (registry name, artifact key) does not exist."""
