"""The LoRA adapters a paged engine serves: loaded at start-up or while serving, bounded, swapped LRU.

Every loaded adapter gets an *id* that is never reused in the process (requests carry it, the prefix
cache roots its block hashes in it: an adapter loaded again under a reused name, or into a slot another
adapter used, starts a fresh hash chain and never meets KV blocks computed with other weights). Its
weights stay in CPU memory (at most ``serving.lora.max_cpu_loras`` adapters); ``serving.lora.max_loras``
device slots (``lora_slots.LoraSlots``) hold the ones requests run with. A request is admitted only once
its adapter sits in a slot: already resident, else written into a free slot or the least recently used
slot that no running sequence uses (:meth:`AdapterPool.can_place`, :meth:`AdapterPool.place_row`); while
every slot is busy the request waits in the queue, it never fails.

Threads: the engine thread places and releases rows; the HTTP side adds and removes adapters. Both hold
the engine's admission lock (``Engine.admission_held``) for anything that changes which ids exist, so a
queued request's id is always loaded (unload refuses an adapter that any queued or running request uses).

Without ``serving.lora.max_loras``, the start-up adapters (``serving.adapters``) get one slot each,
exactly as wide as they need, and nothing is loaded or unloaded while serving.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path

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
        self.capacity = capacity  # adapters loaded in all (max_cpu_loras)
        self.runtime = runtime  # loads and unloads allowed while serving
        self.ids: dict[str, int] = {}  # the engine's live name -> id map (Engine.adapters)
        self.loaded: dict[int, LoraAdapter] = {}
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
        if len(self.loaded) >= self.capacity:
            raise ServingError(f"{len(self.loaded)} adapters are loaded, the most this server holds "
                               f"(serving.lora.max_cpu_loras {self.capacity})",
                               "unload one (POST /v1/unload_lora_adapter), or raise serving.lora.max_cpu_loras")

    def add(self, adapter: LoraAdapter) -> int:
        """Load ``adapter`` (checked with :func:`check` and :meth:`misfit`); its id."""
        self.check(adapter.name)
        cause = self.slots.misfit(adapter)
        if cause is not None:
            raise ServingError(cause, "load an adapter whose rank and target modules fit serving.lora.max_rank and "
                               "serving.lora.target_modules, or raise those (a restart)")
        # Kept in the slots' dtype: a swap is then a plain copy to the device.
        weights = {k: (a.to(self.slots.dtype), b.to(self.slots.dtype)) for k, (a, b) in adapter.weights.items()}
        adapter_id, self._next_id = self._next_id, self._next_id + 1
        self.loaded[adapter_id] = replace(adapter, weights=weights)
        self.ids[adapter.name] = adapter_id
        return adapter_id

    def queued_or_running(self, adapter_id: int, queued_ids: list[int]) -> int:
        """Requests that use ``adapter_id``: rows decoding with it plus ``queued_ids`` (the waiting ones' ids)."""
        return self.users[adapter_id] + queued_ids.count(adapter_id)

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (the caller checked no request uses it); its slot becomes free."""
        adapter_id = self.ids.pop(name)
        del self.loaded[adapter_id]
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
        pool.add(adapter)
    attach(slots, runner)
    return pool


def check_runtime(pool: AdapterPool | None) -> AdapterPool:
    """``pool`` if adapters may be loaded and unloaded while serving; :class:`ServingError` naming the fix otherwise."""
    if pool is None or not pool.runtime:
        raise ServingError("this server loads no LoRA adapters while serving (serving.lora.max_loras is not set)",
                           _MAX_LORAS_FIX)
    return pool
