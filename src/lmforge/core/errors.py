"""Errors a user can cause: each names the cause and the fix.

The CLI prints an ``LmforgeError`` as two lines (``error:`` and ``fix:``) and exits non-zero,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """An expected failure caused by input, configuration or environment."""

    exit_code = 2

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cause}\n  fix: {self.fix}"

    def __reduce__(self):
        # Ray pickles errors from workers to the driver; keep cause and fix across the trip.
        return (type(self), (self.cause, self.fix))


class ConfigError(LmforgeError):
    """A config file is missing, malformed, or holds an unknown key or invalid value."""


class DataError(LmforgeError):
    """Input data is missing, empty, or unusable."""


class ValidationFailed(LmforgeError):
    """The data-quality gate failed; ``report`` is the human-readable list of failures."""

    def __init__(self, cause: str, fix: str, report: str = "", details: dict | None = None) -> None:
        super().__init__(cause, fix)
        self.report = report
        self.details = details or {}

    def __reduce__(self):
        return (type(self), (self.cause, self.fix, self.report, self.details))


class TrainingDiverged(LmforgeError):
    """Training produced a NaN or infinite loss."""


class ServingError(LmforgeError):
    """The inference server could not start or answer (e.g. port in use)."""


class RegistryError(LmforgeError):
    """The model registry refused an operation or holds nothing to act on."""


class OrchestrationError(LmforgeError):
    """A Prefect server (or another platform service) could not start or answer."""
