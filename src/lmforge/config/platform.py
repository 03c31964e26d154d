"""The ``platform`` section: where tracking and compute run (embedded defaults, or a cluster by setting)."""

from __future__ import annotations

from pydantic import Field

from lmforge.config.base import Section


class PlatformConfig(Section):
    """Where each part runs. Empty values mean the embedded default inside LMFORGE_HOME."""

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server URI; default sqlite in the workspace (env MLFLOW_TRACKING_URI wins)."
    )
    ray_address: str | None = Field(None, description="Existing Ray cluster; default a local Ray (env RAY_ADDRESS).")
    schedule_cron: str = Field("0 3 * * 0", description="Retraining schedule of the `lmforge ui` deployment.")
