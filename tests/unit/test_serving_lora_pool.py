"""The LoRA adapter pool of the paged engine (adapters/runtime.py) on a tiny in-memory Llama: ids never
reused, slots written in place, LRU swaps only into slots no running sequence uses, CPU memory an LRU
(weights dropped beyond max_cpu_loras and read again from their source, only if unchanged), fit checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.core.errors import ServingError
from lmforge.serving.adapters.lora_slots import LoraAdapter, LoraSlots
from lmforge.serving.adapters.runtime import AdapterPool, check_runtime


def tiny() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def adapter(name: str, rank: int = 2, module: str = "q_proj", seed: int = 0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    out = 16 if module == "q_proj" else 8
    return LoraAdapter(name, Path(f"/adapters/{name}"),
                       {(0, module): (torch.randn(rank, 16, generator=g), torch.randn(out, rank, generator=g))})


def load(p: AdapterPool, name: str, seed: int = 0, queued: tuple[int, ...] = ()) -> int:
    """Add adapter ``name`` with a source that reads the same weights again, counting the reads."""
    reads[name] = 0

    def source() -> LoraAdapter:
        reads[name] += 1
        return adapter(name, seed=seed)

    return p.add(adapter(name, seed=seed), source, queued)


reads: dict[str, int] = {}


def pool(slots: int = 1, capacity: int = 2) -> AdapterPool:
    model = tiny()
    ranks = {(0, m): 4 for m in ("q_proj", "v_proj")}
    return AdapterPool(LoraSlots(ranks, slots, model, max_rows=4), capacity, runtime=True)


def test_one_slot_swaps_lru_only_when_its_rows_are_done() -> None:
    p = pool()
    a, b = load(p, "a", seed=1), load(p, "b", seed=2)
    p.place_row(0, a)
    assert p.slots.row_slot[0] == 1 and p.can_place(a) and not p.can_place(b)  # b waits while a runs
    stack = p.slots.stacks[(0, "qkv")]
    assert torch.equal(stack.a[:, :2], p.loaded[a].weights[(0, "q_proj")][0].t())
    p.release_row(0)
    assert p.slots.row_slot[0] == 0 and p.can_place(b)
    p.place_row(1, b)
    assert p.resident == {b: 1} and p.swaps == 2
    assert torch.equal(stack.a[:, :2], p.loaded[b].weights[(0, "q_proj")][0].t())
    assert not stack.a[:, 2:4].any()  # a's rank-2 columns only; the rest of the slot's width stays zero
    assert p.queued_or_running(b, [b, a]) == 2 and p.queued_or_running(a, [b, a]) == 1


def test_ids_are_never_reused_and_unload_frees_the_slot() -> None:
    p = pool(slots=2)
    first = load(p, "x")
    p.place_row(0, first)
    p.release_row(0)
    identity = p.identity(first)
    p.remove("x")
    assert p.occupant == {} and p.ids == {}
    again = load(p, "x")  # same name, same path, maybe the same slot: a new identity all the same
    assert again != first and p.identity(again) != identity


def test_cpu_memory_drops_the_least_recently_used_idle_adapter_and_reads_it_again() -> None:
    p = pool(slots=1, capacity=2)
    a, b = load(p, "a", seed=1), load(p, "b", seed=2)
    weights_a = p.loaded[a].weights
    p.place_row(0, a)  # a on the device; b the least recently used
    c = load(p, "c", seed=3)  # beyond the cap: b (idle, not on the device) loses its CPU copy, not a
    assert list(p.in_memory) == [a, c] and p.loaded[b].weights == {} and set(p.ids) == {"a", "b", "c"}
    assert p.pin(a) is False  # in memory: nothing to read
    p.unpin(a)
    assert p.pin(b) is True  # dropped: read it again before its request is queued
    p.restore(b, p.sources[b](), queued=())
    assert reads["b"] == 1 and p.rereads == 1 and b in p.in_memory
    # b is pinned and a resident, so c (least recently used, idle) went to make room.
    assert c not in p.in_memory and p.loaded[c].weights == {}
    p.unpin(b)
    p.release_row(0)
    p.place_row(1, b)  # b swapped into the slot with the weights read again: exactly the loaded ones
    assert torch.equal(p.slots.stacks[(0, "qkv")].a[:, :2], p.loaded[b].weights[(0, "q_proj")][0].t())
    p.release_row(1)
    assert torch.equal(weights_a[(0, "q_proj")][0], p.loaded[a].weights[(0, "q_proj")][0])


def test_queued_and_device_adapters_keep_their_weights() -> None:
    p = pool(slots=1, capacity=1)
    a = load(p, "a")
    p.place_row(0, a)
    b = load(p, "b")  # a is on the device and b just loaded: the pool holds two while both are needed
    assert list(p.in_memory) == [a, b]
    p.release_row(0)  # a stays in its slot, idle
    c = load(p, "c", queued=(b,))  # a resident, b queued, c new: none is dropped
    assert list(p.in_memory) == [a, b, c]
    p.trim(queued=())  # nothing queued now: the idle copies off the device go, least recently used first
    assert list(p.in_memory) == [a] and p.loaded[b].weights == {} and p.loaded[c].weights == {}


def test_weights_changed_at_their_source_are_refused() -> None:
    p = pool(slots=1, capacity=1)
    a = p.add(adapter("a", seed=1), lambda: adapter("a", seed=9))  # the files were rewritten since
    load(p, "b")
    assert p.pin(a) is True
    with pytest.raises(ServingError, match="changed at their source"):
        p.restore(a, p.sources[a]())
    assert a not in p.in_memory


def test_duplicates_and_misfits_are_refused() -> None:
    p = pool(capacity=1)
    load(p, "a")
    with pytest.raises(ServingError, match="already loaded"):
        p.check("a")
    assert "rank 8 at layer 0 q_proj" in (p.slots.misfit(adapter("w", rank=8)) or "")
    assert "k_proj, where the served slots hold rank 0" in (p.slots.misfit(adapter("k", module="k_proj")) or "")
    with pytest.raises(ServingError, match="max_loras"):
        check_runtime(None)
