"""The batching sink of live tracking (lmforge.tracking.metric_stream): records queue in memory and
reach the store in a few log_batch requests, none lost, none on the caller's thread, errors raised.

The store here is a small in-memory stand-in with MLflow's log_batch signature, so the number of
requests can be counted; tests/integration/test_live_tracking.py runs the same sink on real MLflow.
"""

from __future__ import annotations

import threading

import pytest

from lmforge.core.errors import RegistryError
from lmforge.tracking.metric_stream import MetricStream
from lmforge.tracking.mlflow_tracker import MAX_METRICS_PER_BATCH


class Store:
    """Keeps what log_batch receives; ``gate`` (when set) holds every request until it opens."""

    tracking_uri = "memory://"

    def __init__(self, fail: bool = False) -> None:
        self.requests: list[list] = []
        self.fail = fail
        self.gate: threading.Event | None = None
        self.threads: set[str] = set()

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        if self.gate is not None:
            self.gate.wait(30)
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise ConnectionError("tracking server went away")
        self.requests.append(list(metrics))

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for batch in self.requests for m in batch if m.key == key]


def test_records_reach_the_store_in_few_batches_off_the_callers_thread():
    store = Store()
    store.gate = threading.Event()  # the store is slow: the caller must not notice
    stream = MetricStream(store, "run-1", flush_every_s=60)
    for step in range(1, 201):
        stream({"step": step, "phase": "pretrain", "loss": 10 - step / 100, "lr": 1e-3, "tokens_per_s": 5e3})
    stream({"step": 200, "phase": "pretrain", "pretrain_val_loss": 7.5})
    assert store.requests == []  # 200 calls returned while the store held its first request
    store.gate.set()
    stream.close()

    assert store.values("loss") == [(s, 10 - s / 100) for s in range(1, 201)]
    assert store.values("pretrain_val_loss") == [(200, 7.5)]
    assert not any(m.key == "phase" for batch in store.requests for m in batch)  # text is not a metric
    assert stream.written == 601
    # 601 values: one full request of MLflow's 1000-per-request limit would fail; the stream sends at most 1000.
    assert all(len(batch) <= MAX_METRICS_PER_BATCH for batch in store.requests)
    assert len(store.requests) <= 2
    assert threading.current_thread().name not in store.threads


def test_flush_writes_what_is_queued_and_the_stream_goes_on():
    store = Store()
    stream = MetricStream(store, "run-2", flush_every_s=60)
    stream({"step": 1, "loss": 3.0})
    stream.flush()
    assert store.values("loss") == [(1, 3.0)]  # without waiting for the 60 s window
    stream({"step": 2, "loss": 2.5})
    stream.close()
    assert store.values("loss") == [(1, 3.0), (2, 2.5)]
    with pytest.raises(RuntimeError, match="closed"):
        stream({"step": 3, "loss": 2.0})


def test_the_time_window_writes_without_a_flush():
    store = Store()
    stream = MetricStream(store, "run-3", flush_every_s=0.05)
    written = threading.Event()
    original = store.log_batch

    def log_batch(*args, **kwargs):
        original(*args, **kwargs)
        written.set()

    store.log_batch = log_batch  # type: ignore[method-assign]  # observe the background write
    stream({"step": 1, "loss": 1.0})
    assert written.wait(10)
    assert store.values("loss") == [(1, 1.0)]
    stream.close()


def test_a_failed_write_is_raised_with_cause_and_fix():
    stream = MetricStream(Store(fail=True), "run-4", flush_every_s=60)
    stream({"step": 1, "loss": 1.0})
    with pytest.raises(RegistryError, match=r"run-4.*tracking server went away") as info:
        stream.close()
    assert "platform.mlflow_tracking_uri" in info.value.fix
