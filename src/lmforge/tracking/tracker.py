"""Experiment tracking behind a small interface, so the engine runs without MLflow.

Stages take a ``Tracker``; the pipeline passes an MLflow-backed one (``lmforge.tracking.mlflow_tracker``), the
standalone engine a ``NullTracker``. Only rank 0 ever logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log several metrics at once (one batched call, never one call per value)."""

    def log_history(self, history: list[dict[str, Any]]) -> None:
        """Log a whole metric history: dicts with a ``step`` key and numeric values."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...


class NullTracker:
    """Accepts everything and keeps nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_history(self, history: list[dict[str, Any]]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        pass
