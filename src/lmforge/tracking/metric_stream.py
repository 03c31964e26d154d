"""Training metrics to an MLflow run without making the training loop wait on the store.

:class:`MetricStream` is the sink a training run reports to (one record per logged step or
validation, see :mod:`lmforge.train.loop`). A call only puts the record on an in-memory queue; one
background thread turns the records into ``Metric`` entities and writes them with one
``log_batch`` per ``flush_every_s`` seconds (sooner when MLflow's per-request limit of 1000 values
is reached). :meth:`MetricStream.close` writes what is left and stops the thread. One writer thread,
not MLflow's ``synchronous=False`` queue: that one writes every call as its own request from a
thread pool (concurrent writers on a SQLite store) unless a process-wide environment variable asks
it to merge them.

A failed write is never dropped silently: the first error is kept, later records are discarded
(the store is likely down), and :meth:`flush` / :meth:`close` raise it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from lmforge.core.errors import RegistryError
from lmforge.tracking.mlflow_tracker import MAX_METRICS_PER_BATCH, history_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric


class _Flush:
    """A marker on the queue: write everything before it, then signal ``done`` (and stop if ``stop``)."""

    def __init__(self, stop: bool = False) -> None:
        self.stop = stop
        self.done = threading.Event()


class MetricStream:
    """A callable sink: ``stream(record)`` queues a record's numeric values for the run ``run_id``."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float = 5.0) -> None:
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self.error: BaseException | None = None
        self.written = 0  # metric values stored so far (read by tests and summaries)
        self._queue: queue.SimpleQueue[dict[str, Any] | _Flush] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def __call__(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"metric stream of MLflow run {self.run_id} is closed")
        # Stamped now, not when written: MLflow's charts by time then show when the step ran.
        self._queue.put({**record, "_timestamp_ms": int(time.time() * 1000)})

    def flush(self, timeout: float | None = 60.0) -> None:
        """Write every record queued so far; raise the first write error, if any."""
        self._signal(_Flush(), timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Write what is left and stop the thread; raise the first write error, if any."""
        if self._closed:
            return
        self._closed = True
        self._signal(_Flush(stop=True), timeout)
        self._thread.join(timeout)

    def _signal(self, marker: _Flush, timeout: float | None) -> None:
        self._queue.put(marker)
        if not marker.done.wait(timeout):
            raise RegistryError(f"MLflow did not take run {self.run_id}'s metrics within {timeout} s",
                                "check that the tracking server (platform.mlflow_tracking_uri) answers")
        if self.error is not None:
            raise RegistryError(
                f"logging training metrics to MLflow run {self.run_id} at {self.client.tracking_uri} failed: "
                f"{self.error!r}", "check that the tracking server (platform.mlflow_tracking_uri) answers "
                "and accepts writes") from self.error

    def _run(self) -> None:
        pending: list[Metric] = []
        deadline: float | None = None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None  # the oldest pending value has waited flush_every_s
            if isinstance(item, dict):
                stamp = item.pop("_timestamp_ms")
                pending += history_metrics([item], timestamp_ms=stamp)
                deadline = deadline or time.monotonic() + self.flush_every_s
                if len(pending) < MAX_METRICS_PER_BATCH:
                    continue
            self._write(pending)
            pending, deadline = [], None
            if isinstance(item, _Flush):
                item.done.set()
                if item.stop:
                    return

    def _write(self, metrics: list[Metric]) -> None:
        if not metrics or self.error is not None:
            return
        try:
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
            self.written += len(metrics)
        except Exception as exc:  # noqa: BLE001 - kept and raised by flush()/close() in the caller's thread
            self.error = exc
