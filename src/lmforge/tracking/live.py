"""The MLflow run of a training run, open while it trains: params at once, metrics as they come.

The train stage (:func:`lmforge.stages.train.train`) opens a :class:`LiveRun` before any worker
starts: the flattened config goes on as params straight away, every record the loop reports goes
through a :class:`~lmforge.tracking.metric_stream.MetricStream` (batched, in the background), and
MLflow's own ``SystemMetricsMonitor`` samples CPU, memory, disk, network and, where
``nvidia-ml-py`` is installed, GPU use as ``system/...`` metrics. The run ends FINISHED when
training succeeds and FAILED (KILLED on an interrupt) with the error as tags and an ``error.txt``
artifact when it does not. The register stage later logs evaluation metrics, datasets and the
model onto this same run and registers the version with its id (``mlflow_run_id`` in the train
state hand-off).

A resumed training run (``--resume RUN_ID``) reopens the MLflow run of the attempt it continues,
found by its ``lmforge.train_run_id`` tag.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import LmforgeError
from lmforge.core.workspace import Workspace
from lmforge.tracking.metric_stream import MetricStream
from lmforge.tracking.mlflow_tracker import (
    MlflowTracker,
    ensure_experiment,
    flatten_params,
    mlflow_client,
    mlflow_uris,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

TRAIN_RUN_TAG = "lmforge.train_run_id"  # the lmforge run id (runs/<id>/) an MLflow run records
MAX_TAG_CHARS = 5000


def error_tags(error: BaseException, stage: str) -> dict[str, str]:
    """Tags that say why a run failed: the cause and, for our own errors, the fix; shown as the run's note."""
    cause = error.cause if isinstance(error, LmforgeError) else str(error)
    tags = {"lmforge.error": f"{type(error).__name__}: {cause}"[:MAX_TAG_CHARS], "lmforge.failed_stage": stage}
    if isinstance(error, LmforgeError):
        tags["lmforge.error_fix"] = error.fix[:MAX_TAG_CHARS]
    note = f"**{stage} failed**: {tags['lmforge.error']}"
    if isinstance(error, LmforgeError):
        note += f"\n\n**fix**: {error.fix}"
    tags["mlflow.note.content"] = note[:MAX_TAG_CHARS]  # the run page's description
    return tags


def log_new_params(tracker: MlflowTracker, params: dict[str, Any]) -> None:
    """Log ``params`` onto a run that may hold some already (a resumed or registered training run).

    MLflow refuses to change a logged param; a value that differs (a resumed run may lower its
    learning rate) is kept as the tag ``lmforge.param_changed.<key>`` instead.
    """
    held = tracker.client.get_run(tracker.run_id).data.params
    flat = flatten_params(params)
    tracker.log_params({k: v for k, v in flat.items() if k not in held})
    changed = {f"lmforge.param_changed.{k}": v for k, v in flat.items() if k in held and held[k] != v}
    if changed:
        tracker.set_tags(changed)


def mark_failed(client: MlflowClient, run_id: str, stage: str, error: BaseException) -> None:
    """End ``run_id`` FAILED (KILLED for an interrupt) with ``error`` as tags and an ``error.txt`` artifact.

    A failure while recording the failure is attached to ``error`` as a note, never raised over it.
    """
    tracker = MlflowTracker(client, run_id)
    try:
        tracker.set_tags(error_tags(error, stage))
        text = "".join(traceback.format_exception(error))
        client.log_text(run_id, text, "error.txt")
        tracker.finish("FAILED" if isinstance(error, Exception) else "KILLED")
    except Exception as cleanup:  # noqa: BLE001 - reported on the original exception
        error.add_note(f"recording the failure on MLflow run {run_id} also failed: {cleanup!r}")


class LiveRun:
    """One MLflow run that follows a training run from its first step to its end."""

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str, stream: MetricStream,
                 monitor: SystemMetricsMonitor | None, reopened: bool = False) -> None:
        self.client, self.run_id, self.tracking_uri, self.reopened = client, run_id, tracking_uri, reopened
        self.tracker = MlflowTracker(client, run_id)
        self.stream, self.monitor = stream, monitor

    @classmethod
    def open(cls, ws: Workspace, platform: PlatformConfig | None, experiment: str, train_run_id: str,
             resume: bool = False) -> LiveRun:
        """Start (or, for a resumed training run, reopen) the MLflow run of ``train_run_id``."""
        platform = platform or PlatformConfig()
        client = mlflow_client(ws, platform)
        experiment_id = ensure_experiment(client, experiment, ws, platform)
        found = _run_of(client, experiment_id, train_run_id) if resume else None
        if found is not None:
            client.update_run(found, status="RUNNING")
            run_id = found
        else:
            run_id = client.create_run(experiment_id, run_name=train_run_id, tags={TRAIN_RUN_TAG: train_run_id}).info.run_id
        tracking_uri = mlflow_uris(ws, platform)[0]
        stream = MetricStream(client, run_id, platform.mlflow_flush_every_s)
        monitor = None
        if platform.mlflow_system_metrics_interval_s > 0:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Its own client on the same URI (never the process-global one); resume continues its step count.
            monitor = SystemMetricsMonitor(run_id, sampling_interval=platform.mlflow_system_metrics_interval_s,
                                           resume_logging=found is not None, tracking_uri=tracking_uri)
            monitor.start()
        return cls(client, run_id, tracking_uri, stream, monitor, reopened=found is not None)

    def report(self, record: dict[str, Any]) -> None:
        """The training sink: one record (history row or validation loss), queued, never waited on."""
        self.stream(record)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.reopened:
            log_new_params(self.tracker, params)
        else:
            self.tracker.log_params(params)

    def finish(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """Write every queued metric, the final ``metrics`` (at ``step``) and the ``params`` learned
        during training (model size, data sources), then end the run FINISHED."""
        self._stop_monitor()
        self.stream({"step": step, **metrics})
        self.stream.close()
        if params:
            log_new_params(self.tracker, params)
        self.tracker.finish("FINISHED")

    def fail(self, error: BaseException, stage: str = "train") -> None:
        """Keep the metrics reported before ``error``, then end the run FAILED with it."""
        self._stop_monitor()
        try:
            self.stream.close()
        except Exception as lost:  # noqa: BLE001 - the training error is the one to raise; this one is noted on it
            error.add_note(f"some training metrics did not reach MLflow run {self.run_id}: {lost}")
        mark_failed(self.client, self.run_id, stage, error)

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()  # joins its thread and writes the samples it holds
            self.monitor = None


def _run_of(client: MlflowClient, experiment_id: str, train_run_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRAIN_RUN_TAG}` = '{train_run_id}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None
