"""A tensor-parallel worker process: rank 1..N-1 of ``serving.tensor_parallel`` (``tensor_parallel.py`` is rank 0).

:func:`serve_rank` is the process's whole life: build the served model from rank 0's config on this
rank's device, check that its tensors are rank 0's (so the weights' broadcasts pair up), join the
group, receive the weights, cut its :class:`PagedBackend` to this rank's slice, then repeat rank 0's
calls in rank 0's order until told to stop. Any failure is sent to rank 0 before the process exits.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from lmforge.config.serving import ServingConfig
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.model.tensor_parallel import TensorParallel
from lmforge.serving.model.types import LlamaCausalLM

# How long a rank may wait in one collective for the others: far above the longest prefill chunk and the
# first capture's Triton compiles, which every rank runs at the same point.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to become rank ``rank``: pickled to it at spawn."""

    rank: int
    world: int
    store_port: int  # rank 0's TCPStore on loopback, where the group meets
    device: str
    model_config: Any  # the model's PretrainedConfig: the worker builds the same model from it
    dtype: torch.dtype
    manifest: list[tuple[str, tuple[int, ...], str]]  # rank 0's state dict: name, shape, dtype of each tensor
    cfg: ServingConfig
    max_len: int


def tensor_manifest(model: LlamaCausalLM) -> list[tuple[str, tuple[int, ...], str]]:
    """Name, shape and dtype of each tensor of the state dict, in its order (the order of the weights' broadcasts)."""
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items()]


def join_group(store: dist.TCPStore, rank: int, world: int, device: torch.device) -> None:
    """This process as ``rank`` of the group meeting at ``store``: NCCL on GPUs, gloo on CPUs."""
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if cuda else None)


def broadcast_weights(model: LlamaCausalLM) -> None:
    """Every tensor of the state dict, from rank 0 into every other rank's (the state dict views the model's
    storage); both sides walk it in the same order, which the manifest check made the same."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor.contiguous(), src=0)


def serve_rank(spec: WorkerSpec, conn: Connection) -> None:
    """A worker's whole life: build the model, join the group, take the weights, then repeat rank 0's calls
    until it says stop. Any failure is sent to rank 0 before the process exits."""
    try:
        torch.set_num_threads(1)  # a CPU rank is for tests and small models: one thread each, as the engine's
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = _build_model(spec, device)
        conn.send(("built",))
        store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world, is_master=False,
                              timeout=COLLECTIVE_TIMEOUT)
        join_group(store, spec.rank, spec.world, device)
        broadcast_weights(model)
        with torch.inference_mode():
            backend = PagedBackend(model, spec.cfg, spec.max_len, tp=TensorParallel(spec.rank, spec.world))
            conn.send(("ready",))
            _follow(backend, conn, spec.cfg.scheduler.max_batch_size, device)
    except (EOFError, KeyboardInterrupt):
        pass  # rank 0 went away: nothing left to serve
    except Exception as exc:  # noqa: BLE001 - any failure of a rank is told to rank 0, which raises it at its next call
        traceback.print_exc()
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _build_model(spec: WorkerSpec, device: torch.device) -> LlamaCausalLM:
    """The model rank 0 serves, built from its config on ``device`` (weights arrive by broadcast), checked to
    have the same tensors as rank 0's, so that the broadcasts pair up."""
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(spec.model_config, dtype=spec.dtype)
    model.eval()
    mine = tensor_manifest(model)
    if mine != spec.manifest:
        differ = next((a, b) for a, b in zip([*mine, None], [*spec.manifest, None]) if a != b)
        raise ValueError(f"the model built from the config differs from rank 0's: {differ[0]} here, {differ[1]} on "
                         "rank 0 (a model changed after loading cannot be split)")
    return model


def _follow(backend: PagedBackend, conn: Connection, max_rows: int, device: torch.device) -> None:
    """Repeat rank 0's calls, in its order, until it says stop."""
    tokens = torch.empty(max_rows, dtype=torch.long, device=device)  # a decode step's tokens sent by broadcast
    while True:
        call = conn.recv()
        kind = call[0]
        if kind == "stop":
            return
        if kind == "reserve":
            _, count, prompt, adapter, row = call
            got = backend.reserve(count, prompt, adapter)
            if got != row:
                raise RuntimeError(f"this rank reserved cache row {got} where rank 0 reserved {row}: the ranks' "
                                   "block tables diverged")
        elif kind == "release":
            backend.release(call[1])
        elif kind == "prefill":
            backend.prefill(call[1])
        elif kind == "decode":
            _, rows, positions, ids = call
            if ids is None:
                ids = tokens[:len(rows)]
                dist.broadcast(ids, src=0)
            backend.decode(rows, positions, ids)
        elif kind == "verify":
            backend.verify(*call[1:])
        else:
            raise RuntimeError(f"unknown call {kind!r} from rank 0")
