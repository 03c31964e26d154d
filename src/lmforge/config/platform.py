"""The ``platform`` section: where tracking and compute run (embedded defaults, or a cluster by setting)."""

from __future__ import annotations

from pydantic import Field

from lmforge.config.base import Section


class PlatformConfig(Section):
    """Where each part runs. Empty values mean the embedded default inside LMFORGE_HOME."""

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server URI; default sqlite in the workspace (env MLFLOW_TRACKING_URI wins)."
    )
    mlflow_system_metrics_interval_s: float = Field(
        10.0, ge=0, description="Seconds between MLflow system metrics samples (CPU, memory, GPU) of a training "
        "run; 0 turns them off (env MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins).")
    mlflow_flush_every_s: float = Field(
        5.0, gt=0, description="Seconds training metrics wait in memory before one batched write to MLflow.")
    ray_address: str | None = Field(None, description="Existing Ray cluster; default a local Ray (env RAY_ADDRESS).")
    schedule_cron: str = Field("0 3 * * 0", description="Retraining schedule of the `lmforge ui` deployment.")
