"""Tensor-parallel serving (``serving.tensor_parallel: N``): one engine over N devices, each with 1/N of every layer.

The engine, its scheduler and its sampler stay in the server's process, which is rank 0. N - 1 worker
processes, one per further GPU (``tp_worker.py``), each hold a :class:`PagedBackend` cut to their
rank's heads, MLP width and KV-cache heads (``model/tensor_parallel.py``). Rank 0's :class:`TensorParallelBackend` is the
engine's backend: every call that changes a backend (admission, release, a forward pass) runs on its
own backend and is sent, in the same order, to each worker, which makes the same call on its own.
The block allocator is deterministic, so the ranks' block tables stay equal without ever being sent,
and their forward passes meet in the same all-reduces (NCCL on GPUs, CUDA graphs included; gloo on
CPUs). Calls that only read (can_reserve, cached_tokens, cache_usage) are answered by rank 0 alone,
and only rank 0's logits are sampled.

A call goes to a worker as a pickled tuple on its pipe. The tokens of a decode step launched ahead
(still being chosen on the device) go by a broadcast in stream order instead, so no rank waits for
the GPU. The weights come from rank 0 too: each worker builds the model from its config on its own
device and receives every tensor of rank 0's state dict by broadcast, so the workers serve whatever
model object the engine was given (a loaded directory, merged adapters, a benchmark's random weights)
without reading the disk again. Every rank then keeps its slices and frees the whole layers.

A worker that fails sends its error on its pipe and exits; rank 0 raises it as :class:`BackendLost` at
its next call (a dead worker is seen the same way, by its closed pipe), and the engine then fails every
request and reports itself unhealthy: the group cannot go on without a rank, so the server must be
restarted. A collective that a dead worker never joins fails after ``COLLECTIVE_TIMEOUT``: gloo at
once, NCCL by its watchdog, which ends the process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.adapters.virtual_tokens import prefix_of
from lmforge.serving.backends.base import BackendLost, PrefillItem
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.backends.tp_worker import (
    COLLECTIVE_TIMEOUT,
    WorkerSpec,
    broadcast_weights,
    join_group,
    serve_rank,
    tensor_manifest,
)
from lmforge.serving.model.tensor_parallel import TensorParallel, unshardable
from lmforge.serving.model.types import LlamaCausalLM

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

_RESTART = "restart the server; look for the rank's error in its log (out of memory, a killed process)"
_STOP_TIMEOUT_S = 10.0  # well inside the 30 s the engine waits for its thread, which calls close()


def rank_devices(base: torch.device, world: int) -> list[torch.device]:
    """Each rank's device: on CUDA, ``base`` and the ``world - 1`` GPUs after it; on a CPU, the CPU for all."""
    if base.type != "cuda":
        return [base] * world
    first = base.index if base.index is not None else torch.cuda.current_device()
    have = torch.cuda.device_count()
    if first + world > have:
        raise ServingError(f"serving.tensor_parallel {world} needs GPUs {first} to {first + world - 1}, and this "
                           f"machine shows {have}", f"set serving.tensor_parallel to {max(1, have - first)} or less, "
                           "or serve from an earlier GPU (serving.runtime.device)")
    return [torch.device("cuda", first + rank) for rank in range(world)]


class TensorParallelBackend:
    """Rank 0 of a tensor-parallel group: a :class:`PagedBackend` over its own slice, whose state-changing
    calls every worker repeats (see the module docstring)."""

    name = "paged"
    chunked_prefill = True
    overlap = True
    reserves_worst_case = True
    virtual_tokens = 0  # a prompt-learning prefix is refused below
    lora = None  # unmerged LoRA adapters are refused by the config (not split yet)

    def __init__(self, model: LlamaCausalLM, cfg: ServingConfig, max_len: int) -> None:
        world = cfg.tensor_parallel
        reason = unshardable(model, world)
        if reason:
            raise ServingError(f"serving.tensor_parallel {world} cannot split this model: {reason}",
                               "set serving.tensor_parallel to a number that divides the model's attention heads, "
                               "key/value heads and MLP width (1: no split)")
        if prefix_of(model) is not None:
            raise ServingError("serving.tensor_parallel does not split a prompt-learning adapter's prefix yet",
                               "serve this model with serving.tensor_parallel: 1")
        if dist.is_initialized():
            raise ServingError("this process is already in a torch.distributed group, and the tensor-parallel "
                               "engine needs the default group for its own ranks",
                               "serve the model from a process of its own (lmforge serve)")
        weight = model.get_input_embeddings().weight
        devices = rank_devices(weight.device, world)
        self._workers: list[_Worker] = []
        self._failure: BackendLost | None = None
        self._closed = False
        # The group meets at a store on a port the OS picked: nothing to race for between choosing and binding.
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                              wait_for_workers=False)
        manifest = tensor_manifest(model)
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA cannot be forked once initialised
        try:
            for rank in range(1, world):
                spec = WorkerSpec(rank, world, store.port, str(devices[rank]), model.config, weight.dtype, manifest,
                                   cfg, max_len)
                mine, theirs = ctx.Pipe()
                process = ctx.Process(target=serve_rank, args=(spec, theirs), name=f"lmforge-tp-rank{rank}",
                                      daemon=True)
                process.start()
                theirs.close()
                self._workers.append(_Worker(rank, process, mine))
            for worker in self._workers:  # each built its model and checked the manifest: no rank joins to fail
                worker.expect("built", cfg.server.startup_timeout_s)
            join_group(store, 0, world, devices[0])
            broadcast_weights(model)
            self.tp = TensorParallel(0, world)
            self.local = PagedBackend(model, cfg, max_len, tp=self.tp)
            for worker in self._workers:
                worker.expect("ready", cfg.server.startup_timeout_s)
        except BaseException:
            self.close()
            raise
        log.info("tensor parallel over %d ranks (%s): %d KV cache blocks on each", world,
                 ", ".join(str(d) for d in devices), self.local.cache.num_blocks)

    # ------------------------------------------------------------ read by rank 0 alone

    @property
    def adapter_slots(self) -> Mapping[str, int]:
        return {}

    def fits_ever(self, tokens: int) -> bool:
        return self.local.fits_ever(tokens)

    def can_reserve(self, tokens: int, prompt: Sequence[int] = (), adapter: int = 0) -> bool:
        return self.local.can_reserve(tokens, prompt, adapter)

    def cached_tokens(self, row: int) -> int:
        return self.local.cached_tokens(row)

    def prefill_waits(self, row: int) -> Sequence[tuple[int, int]]:
        return self.local.prefill_waits(row)

    def grow(self, row: int, tokens: int) -> bool:
        return True  # admission reserved the sequence's worst case, on every rank

    def set_adapter(self, row: int, slot: int) -> None:
        self.local.set_adapter(row, slot)  # slot 0 (no adapter) is all there is: nothing for the workers to do

    @property
    def cache_usage(self) -> float:
        return self.local.cache_usage

    # ------------------------------------------------------------ repeated by every worker

    def reserve(self, tokens: int, prompt: Sequence[int] = (), adapter: int = 0) -> int:
        row = self.local.reserve(tokens, prompt, adapter)
        # The prompt matters to the allocator only through prefix caching's block hashes.
        self._send("reserve", tokens, list(prompt) if self.local.prefix_caching else [], adapter, row)
        return row

    def release(self, row: int) -> None:
        """Never raises: it runs while failing requests, and once a worker is lost the group is done anyway."""
        self.local.release(row)
        with contextlib.suppress(BackendLost):
            self._send("release", row)

    def prefill(self, items: list[PrefillItem]) -> list[torch.Tensor]:
        self._send("prefill", items)  # first: the workers launch while this rank does
        with self._together("prefill"):
            return self.local.prefill(items)

    def decode(self, rows: list[int], positions: list[int], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        self._send("decode", rows, positions, None if isinstance(tokens, torch.Tensor) else tokens)
        with self._together("decode step"):
            if isinstance(tokens, torch.Tensor):
                # Still being chosen on the device: sent in stream order, after the sampling that writes them.
                tokens = tokens.to(torch.long).contiguous()
                dist.broadcast(tokens, src=0)
            return self.local.decode(rows, positions, tokens)

    def verify(self, rows: list[int], positions: list[int], runs: list[list[int]]) -> list[torch.Tensor]:
        self._send("verify", rows, positions, runs)
        with self._together("verify step"):
            return self.local.verify(rows, positions, runs)

    def lost(self) -> BackendLost | None:
        """Why no step can run any more (None: they can): a failure seen, or a worker no longer alive, which an
        idle server learns here (``/health``, any thread: it reads no pipe) rather than at its next request."""
        if self._failure is not None:
            return self._failure
        dead = next((w for w in self._workers if not w.process.is_alive()), None)
        return None if dead is None else BackendLost(
            f"tensor-parallel rank {dead.rank} exited (exit code {dead.process.exitcode})", _RESTART)

    def _send(self, *call: Any) -> None:
        if self._failure is None:
            # Every worker is checked before any is sent the call: a call half the group runs would leave those
            # ranks waiting in its collectives.
            for worker in self._workers:
                if worker.conn.poll():  # a worker speaks only to report a failure (or its pipe closed: it died)
                    self._failure = worker.failure()
                    break
        if self._failure is None:
            try:
                for worker in self._workers:
                    worker.conn.send(call)
                return
            except OSError:
                self._failure = next((w.failure() for w in self._workers if not w.process.is_alive()),
                                     BackendLost("a tensor-parallel worker's pipe closed", _RESTART))
        raise BackendLost(self._failure.cause, self._failure.fix)  # a fresh one: no traceback piles up

    @contextlib.contextmanager
    def _together(self, what: str) -> Iterator[None]:
        """Rank 0's part of a forward the workers were sent: if it fails here alone (out of memory, say), the
        workers are already in its collectives, so the group can never pair them up again."""
        try:
            yield
        except Exception as exc:
            self._failure = BackendLost(f"rank 0's {what} failed after the other ranks began it ({type(exc).__name__}: "
                                        f"{exc}); the ranks' collectives no longer pair up",
                                        "restart the server; if rank 0 ran out of memory, lower "
                                        "serving.kv_cache.memory_mb or serving.scheduler.max_batch_size")
            raise BackendLost(self._failure.cause, self._failure.fix) from exc

    # ------------------------------------------------------------ shutting down

    def close(self) -> None:
        """Stop the workers (they leave the group) and leave it; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError):  # already gone
                worker.conn.send(("stop",))
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("tensor-parallel rank %d did not stop in %.0f s: terminated", worker.rank, _STOP_TIMEOUT_S)
                worker.process.terminate()
                worker.process.join(5)
            worker.conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Worker:
    """Rank 0's handle on one worker process."""

    rank: int
    process: BaseProcess
    conn: Connection

    def expect(self, word: str, timeout_s: float) -> None:
        """Wait for the worker to report ``word``; its failure (an error it sent, its exit) as a ServingError."""
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.1):
            if not self.process.is_alive():
                raise self.failure()
            if time.monotonic() > deadline:
                raise ServingError(f"tensor-parallel rank {self.rank} did not start in {timeout_s:g} s",
                                   "raise serving.server.startup_timeout_s, or look for the rank's error above")
        message = self._receive()
        if message != (word,):
            raise self.failure(message)

    def failure(self, message: tuple[Any, ...] | None = None) -> BackendLost:
        """The error this worker reported (read from its pipe unless given), or the fact that it exited."""
        if message is None and self.conn.poll():
            message = self._receive()
        if message is not None and message[0] == "error":
            return BackendLost(f"tensor-parallel rank {self.rank} failed: {message[1]}",
                                "fix the cause and restart the server; the rank's traceback is in its log")
        self.process.join(1)
        return BackendLost(f"tensor-parallel rank {self.rank} exited (exit code {self.process.exitcode})", _RESTART)

    def _receive(self) -> tuple[Any, ...] | None:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None
