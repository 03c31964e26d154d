"""The ``platform`` section: where tracking and compute run (embedded defaults, or a cluster by setting)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section


class PlatformConfig(Section):
    """Where each part runs. Empty values mean the embedded default inside LMFORGE_HOME."""

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server URI; default sqlite in the workspace (env MLFLOW_TRACKING_URI wins)."
    )
    mlflow_artifacts: str | None = Field(
        None, description="Where MLflow keeps model and run artifacts, as a URL (s3://bucket/mlflow, gs://, ...): "
        "the MLflow server lmforge starts serves them (--artifacts-destination with --serve-artifacts) and "
        "experiments lmforge creates in a SQLite/file store write there. Default: <LMFORGE_HOME>/mlflow-artifacts "
        "for an object-store workspace, else the workspace's mlflow/artifacts directory. Credentials come from "
        "the store's standard chain (AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL for S3-compatible servers), "
        "never from here. With an object-store workspace the default tracking store (SQLite) stays on this "
        "machine: fine for one machine; a team shares an MLflow server (platform.mlflow_tracking_uri).")
    mlflow_system_metrics_interval_s: float = Field(
        10.0, ge=0, description="Seconds between MLflow system metrics samples (CPU, memory, GPU) of a training "
        "run; 0 turns them off (env MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins).")
    mlflow_flush_every_s: float = Field(
        5.0, gt=0, description="Seconds training metrics wait in memory before one batched write to MLflow.")
    @field_validator("mlflow_artifacts")
    @classmethod
    def _artifacts_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^(file:///|[A-Za-z][A-Za-z0-9+.\-]+://[^/])", value):
            raise ValueError(f"{value!r} is not a URL: set platform.mlflow_artifacts to one such as s3://bucket/mlflow")
        return value.rstrip("/")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        # A section-level check, so the error shows the section, never the value holding the secret.
        value = data.get("mlflow_artifacts") if isinstance(data, Mapping) else None
        if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("platform.mlflow_artifacts holds credentials (user:password@): remove them and use "
                             "the store's standard credential chain (environment, profile or instance role)")
        return data

    ray_address: str | None = Field(None, description="Existing Ray cluster; default a local Ray (env RAY_ADDRESS).")
    schedule_cron: str = Field("0 3 * * 0", description="Retraining schedule: of the `lmforge ui` deployment and "
                               "of the stack's `lmforge-pipeline/retrain` (`lmforge stack deploy`), which continues "
                               "from the champion.")
    # Data-arrival retraining (`lmforge stack deploy`): off by default, since a retrain costs compute and
    # moves the champion only by the promotion policy, but a user should opt in to unattended training.
    retrain_on_new_data: bool = Field(
        False, description="Retrain from the champion when new documents arrive: the stack's "
        "`lmforge-collect/watch` deployment collects every platform.watch_interval_s seconds and emits "
        "`lmforge.data.collected` only when new documents arrived; that event starts `lmforge-pipeline/retrain`, "
        "at most once per platform.retrain_debounce_s.")
    watch_interval_s: int = Field(
        300, ge=10, description="Seconds between the collect runs of `lmforge-collect/watch` (with "
        "platform.retrain_on_new_data).")
    retrain_debounce_s: int = Field(
        3600, ge=1, description="Debounce window of data-arrival retraining: the first `lmforge.data.collected` "
        "starts a retrain, later ones within this many seconds start none (the retrain's own collect reads "
        "whatever arrived before it started; data arriving later waits for the next event or schedule).")
