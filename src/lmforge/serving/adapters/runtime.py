"""The LoRA adapters a paged engine serves: loaded at start-up or while serving, bounded, swapped LRU.

Every loaded adapter gets an *id* that is never reused in the process (requests carry it, the prefix
cache roots its block hashes in it: an adapter loaded again under a reused name, or into a slot another
adapter used, starts a fresh hash chain and never meets KV blocks computed with other weights).

CPU memory holds the weights of at most ``serving.lora.max_cpu_loras`` adapters, least recently used
dropped first: beyond the cap, the least recently used adapter that is not on the device, not used by a
running or queued request and not pinned loses its CPU copy (it stays loaded and listed). A request for
it reads the weights again from the source recorded at load (its directory, or its registry version:
``api/admin.py``'s ``adapter_held``), before the request is queued, and only the same weights are
accepted (a digest taken at load: the prefix cache keys blocks by the load, not by the files). The
adapter is pinned from then until its request is queued, and a queued adapter is never dropped, so the
engine thread always finds the weights it swaps in.

``serving.lora.max_loras`` device slots (``lora_slots.LoraSlots``) hold the ones requests run with. A
request is admitted only once its adapter sits in a slot: already resident, else written into a free
slot or the least recently used slot that no running sequence uses (:meth:`AdapterPool.can_place`,
:meth:`AdapterPool.place_row`); while every slot is busy the request waits in the queue, it never fails.

Threads: the engine thread places and releases rows; the HTTP side adds and removes adapters. Both hold
the engine's admission lock (``Engine.admission_held``) for anything that changes which ids exist, so a
queued request's id is always loaded (unload refuses an adapter that any queued or running request uses).

Without ``serving.lora.max_loras``, the start-up adapters (``serving.adapters``) get one slot each,
exactly as wide as they need, and nothing is loaded or unloaded while serving.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.adapters.lora_slots import LoraAdapter, LoraSlots, attach, read_adapter, widest_ranks
from lmforge.serving.model.runner import LlamaRunner
from lmforge.serving.model.types import LlamaCausalLM

_MAX_LORAS_FIX = "set serving.lora.max_loras (device slots) to load and unload LoRA adapters while serving"


class AdapterPool:
    """Loaded adapters (name -> id), their weights in CPU memory, and which of them sits in which device slot."""

    def __init__(self, slots: LoraSlots, capacity: int, runtime: bool) -> None:
        self.slots = slots
        self.capacity = capacity  # adapters whose weights CPU memory holds (max_cpu_loras)
        self.runtime = runtime  # loads and unloads allowed while serving
        self.ids: dict[str, int] = {}  # the engine's live name -> id map (Engine.adapters)
        self.loaded: dict[int, LoraAdapter] = {}  # every loaded adapter; weights {} once dropped from memory
        self.in_memory: OrderedDict[int, None] = OrderedDict()  # ids with weights in CPU memory, LRU first
        self.sources: dict[int, Callable[[], LoraAdapter]] = {}  # id -> reads its weights again
        self.digests: dict[int, str] = {}  # id -> digest of the weights loaded (a re-read must match)
        self.pins: Counter[int] = Counter()  # id -> requests about to be queued with it (admin.adapter_held)
        self.rereads = 0  # weights read again after they were dropped
        self.resident: dict[int, int] = {}  # id -> slot
        self.occupant: dict[int, int] = {}  # slot -> id
        self.recent: OrderedDict[int, None] = OrderedDict()  # slots, least recently placed first
        self.row_id: dict[int, int] = {}  # cache row -> id it decodes with
        self.users: Counter[int] = Counter()  # id -> rows decoding with it now
        self.swaps = 0  # adapters written into a slot (first placements and swaps)
        self._next_id = 1

    def identity(self, adapter_id: int) -> tuple[object, ...]:
        """What the prefix cache roots this adapter's block hashes in: unique per load."""
        adapter = self.loaded[adapter_id]
        return ("lora", adapter_id, adapter.name, str(adapter.path))

    # ------------------------------------------------------------ loading (hold the engine's admission lock)

    def check(self, name: str) -> None:
        """Raise :class:`ServingError` if an adapter named ``name`` could not be added now."""
        if name in self.ids:
            raise ServingError(f"an adapter named {name!r} is already loaded",
                               "unload it first (POST /v1/unload_lora_adapter) or pick another lora_name")

    def add(self, adapter: LoraAdapter, source: Callable[[], LoraAdapter], queued: Collection[int] = ()) -> int:
        """Load ``adapter`` (checked with :func:`check` and :meth:`misfit`); its id. ``source`` reads it again
        once its weights were dropped from CPU memory; ``queued``: the ids waiting requests use (kept)."""
        self.check(adapter.name)
        adapter_id, self._next_id = self._next_id, self._next_id + 1
        self.loaded[adapter_id] = self._converted(adapter)
        self.digests[adapter_id] = _digest(self.loaded[adapter_id])
        self.ids[adapter.name], self.sources[adapter_id] = adapter_id, source
        self.in_memory[adapter_id] = None
        self.trim([*queued, adapter_id])  # not itself: a load is for requests to come
        return adapter_id

    def _converted(self, adapter: LoraAdapter) -> LoraAdapter:
        cause = self.slots.misfit(adapter)
        if cause is not None:
            raise ServingError(cause, "load an adapter whose rank and target modules fit serving.lora.max_rank and "
                               "serving.lora.target_modules, or raise those (a restart)")
        # Kept in the slots' dtype: a swap is then a plain copy to the device.
        return replace(adapter, weights={k: (a.to(self.slots.dtype), b.to(self.slots.dtype))
                                         for k, (a, b) in adapter.weights.items()})

    # ------------------------------------------------------------ CPU memory (hold the engine's admission lock)

    def pin(self, adapter_id: int) -> bool:
        """Keep ``adapter_id`` in memory until :meth:`unpin` (it counts as used now); whether its weights must be
        read again (:meth:`restore`) first."""
        self.pins[adapter_id] += 1
        if adapter_id in self.in_memory:
            self.in_memory.move_to_end(adapter_id)
            return False
        return True

    def unpin(self, adapter_id: int) -> None:
        self.pins[adapter_id] -= 1
        if self.pins[adapter_id] <= 0:
            del self.pins[adapter_id]

    def restore(self, adapter_id: int, adapter: LoraAdapter, queued: Collection[int] = ()) -> None:
        """Put ``adapter`` (read again from its source) back in memory as ``adapter_id``; :class:`ServingError`
        if its weights are not the ones loaded. A no-op if it was unloaded or restored meanwhile."""
        if adapter_id not in self.loaded or adapter_id in self.in_memory:
            return
        again = self._converted(adapter)
        if _digest(again) != self.digests[adapter_id]:
            name = self.loaded[adapter_id].name
            raise ServingError(f"the weights of LoRA adapter {name!r} changed at their source since it was loaded "
                               "(they were dropped from CPU memory and read again)",
                               f"load the new weights under a new name, or unload {name!r} and load it again")
        self.loaded[adapter_id] = replace(self.loaded[adapter_id], weights=again.weights)
        self.in_memory[adapter_id] = None
        self.rereads += 1
        self.trim(queued)

    def trim(self, queued: Collection[int] = ()) -> None:
        """Drop the CPU copies of the least recently used adapters beyond the cap, sparing those on the device,
        in use, pinned or in ``queued``; the pool holds more while every copy is needed."""
        spare = set(queued) | set(self.resident) | set(self.pins) | {i for i, n in self.users.items() if n}
        for adapter_id in [i for i in self.in_memory if i not in spare]:
            if len(self.in_memory) <= self.capacity:
                return
            del self.in_memory[adapter_id]
            self.loaded[adapter_id] = replace(self.loaded[adapter_id], weights={})

    def queued_or_running(self, adapter_id: int, queued_ids: list[int]) -> int:
        """Requests that use ``adapter_id``: rows decoding with it plus ``queued_ids`` (the waiting ones' ids)."""
        return self.users[adapter_id] + queued_ids.count(adapter_id)

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (the caller checked no request uses it); its slot becomes free."""
        adapter_id = self.ids.pop(name)
        del self.loaded[adapter_id], self.sources[adapter_id], self.digests[adapter_id]
        self.in_memory.pop(adapter_id, None)
        slot = self.resident.pop(adapter_id, None)
        if slot is not None:
            del self.occupant[slot]
            self.recent.pop(slot, None)

    # ------------------------------------------------------------ slots (engine thread, at admission)

    def can_place(self, adapter_id: int) -> bool:
        """Whether a row may decode with ``adapter_id`` now: it is resident, or a slot is free or idle."""
        return (adapter_id == 0 or adapter_id in self.resident or len(self.occupant) < self.slots.count
                or any(self.users[self.occupant[slot]] == 0 for slot in self.recent))

    def place_row(self, row: int, adapter_id: int) -> None:
        """Decode ``row`` with ``adapter_id`` (0: the base), swapping it into a slot first if it is not resident."""
        if adapter_id == 0:
            self.slots.set_row(row, 0)
            return
        slot = self.resident.get(adapter_id)
        if slot is None:
            slot = self._swap_in(adapter_id)
        if adapter_id in self.in_memory:  # admission holds the engine's lock: the LRU may be touched here
            self.in_memory.move_to_end(adapter_id)
        self.recent.move_to_end(slot)
        self.slots.set_row(row, slot)
        self.row_id[row] = adapter_id
        self.users[adapter_id] += 1

    def release_row(self, row: int) -> None:
        """``row`` no longer decodes (finished, cancelled, preempted): it stops holding its adapter's slot."""
        adapter_id = self.row_id.pop(row, 0)
        if adapter_id:
            self.users[adapter_id] -= 1
        self.slots.set_row(row, 0)  # a later base request on this row must not see the old slot

    def _swap_in(self, adapter_id: int) -> int:
        if adapter_id not in self.in_memory:  # never: a queued or pinned adapter keeps its weights (trim)
            raise ServingError(f"LoRA adapter {self.loaded[adapter_id].name!r} was admitted without its weights in "
                               "CPU memory", "report this bug; unload and load the adapter again")
        free = [s for s in range(1, self.slots.count + 1) if s not in self.occupant]
        if free:
            slot = free[0]
        else:  # the least recently used slot no running sequence needs (can_place said there is one)
            slot = next(s for s in self.recent if self.users[self.occupant[s]] == 0)
            del self.resident[self.occupant[slot]]
        self.slots.write(slot, self.loaded[adapter_id])
        self.occupant[slot], self.resident[adapter_id] = adapter_id, slot
        self.recent[slot] = None
        self.swaps += 1
        return slot


def make_pool(cfg: ServingConfig, model: LlamaCausalLM, runner: LlamaRunner) -> AdapterPool | None:
    """The pool for ``serving.adapters`` and ``serving.lora``, attached to ``runner`` (None: no LoRA served)."""
    startup = [read_adapter(name, Path(path), model) for name, path in cfg.adapters.items()]
    lora = cfg.lora
    if lora.max_loras is None:
        if not startup:
            return None
        slots = LoraSlots(widest_ranks(startup), len(startup), model, cfg.scheduler.max_batch_size)
        pool = AdapterPool(slots, len(startup), runtime=False)
    else:
        ranks: dict[tuple[int, str], int] = {(i, str(m)): lora.max_rank for i in range(len(model.model.layers))
                                             for m in lora.target_modules}
        capacity = lora.max_cpu_loras or lora.max_loras
        if len(startup) > capacity:
            raise ServingError(f"serving.adapters names {len(startup)} adapters, more than serving.lora."
                               f"max_cpu_loras ({capacity}) lets the server hold", "raise serving.lora.max_cpu_loras")
        slots = LoraSlots(ranks, lora.max_loras, model, cfg.scheduler.max_batch_size)
        pool = AdapterPool(slots, capacity, runtime=True)
    for adapter in startup:
        pool.add(adapter, functools.partial(read_adapter, adapter.name, adapter.path, model))
    attach(slots, runner)
    return pool


def check_runtime(pool: AdapterPool | None) -> AdapterPool:
    """``pool`` if adapters may be loaded and unloaded while serving; :class:`ServingError` naming the fix otherwise."""
    if pool is None or not pool.runtime:
        raise ServingError("this server loads no LoRA adapters while serving (serving.lora.max_loras is not set)",
                           _MAX_LORAS_FIX)
    return pool


def _digest(adapter: LoraAdapter) -> str:
    """A digest of ``adapter``'s weights as served (the slots' dtype)."""
    h = hashlib.sha256()
    for key, pair in sorted(adapter.weights.items()):
        h.update(repr(key).encode())
        for tensor in pair:
            h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
