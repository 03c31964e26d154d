"""Rank 0's training records, live, from a Ray Train worker to the process that launched it.

Under Ray the loop runs in worker processes, possibly on other machines that have neither MLflow
nor the driver's disk (the default tracking store is a SQLite file in the driver's workspace). So
the worker does not log anywhere itself: rank 0 hands each record (history row or validation loss)
to a Ray queue actor, fire and forget, and a thread in the driver passes them to the train stage's
callbacks (progress lines, the MLflow sink) as they arrive. Ray is imported only here, inside
functions: the in-line path never needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Record = dict[str, Any]


class QueueSink:
    """The worker's side: picklable (it holds only the queue actor's handle), travels in the job."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, record: Record) -> None:
        # No ray.get: the loop does not wait for a round trip. One caller's calls to an actor run in order.
        self.actor.put_nowait.remote(record)

    def flush(self) -> None:
        """Return once every record sent so far is in the queue (a call after them has completed)."""
        import ray

        ray.get(self.actor.qsize.remote())


class RecordRelay:
    """The driver's side: a queue actor, and a thread delivering its records to ``deliver``."""

    POLL_S = 0.25  # how long one get waits; also how soon close() returns once the queue is empty

    def __init__(self, deliver: Callable[[Record], None]) -> None:
        from ray.util.queue import Queue

        # No CPU reserved: the actor only holds records, and training workers may need every core.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.sink = QueueSink(self.queue.actor)
        self.deliver = deliver
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="lmforge-train-records", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                record = self.queue.get(timeout=self.POLL_S)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            if self.error is None:
                try:
                    self.deliver(record)
                except Exception as exc:  # noqa: BLE001 - raised by close() in the driver's thread
                    self.error = exc

    def close(self, raise_error: bool = True) -> None:
        """Deliver what the workers sent (they flush before returning), stop, and raise a delivery error."""
        self._stop.set()
        self._thread.join()
        self.queue.shutdown(force=True)  # empty by now: nothing to wait for
        if raise_error and self.error is not None:
            raise self.error
