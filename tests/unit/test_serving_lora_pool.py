"""The LoRA adapter pool of the paged engine (adapters/runtime.py) on a tiny in-memory Llama: ids never
reused, slots written in place, LRU swaps only into slots no running sequence uses, capacity and fit checks."""

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


def pool(slots: int = 1, capacity: int = 2) -> AdapterPool:
    model = tiny()
    ranks = {(0, m): 4 for m in ("q_proj", "v_proj")}
    return AdapterPool(LoraSlots(ranks, slots, model, max_rows=4), capacity, runtime=True)


def test_one_slot_swaps_lru_only_when_its_rows_are_done() -> None:
    p = pool()
    a, b = p.add(adapter("a", seed=1)), p.add(adapter("b", seed=2))
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
    first = p.add(adapter("x"))
    p.place_row(0, first)
    p.release_row(0)
    identity = p.identity(first)
    p.remove("x")
    assert p.occupant == {} and p.ids == {}
    again = p.add(adapter("x"))  # same name, same path, maybe the same slot: a new identity all the same
    assert again != first and p.identity(again) != identity


def test_capacity_duplicates_and_misfits_are_refused() -> None:
    p = pool(capacity=1)
    p.add(adapter("a"))
    with pytest.raises(ServingError, match="already loaded"):
        p.check("a")
    with pytest.raises(ServingError, match="max_cpu_loras 1"):
        p.check("b")
    assert "rank 8 at layer 0 q_proj" in (p.slots.misfit(adapter("w", rank=8)) or "")
    assert "k_proj, where the served slots hold rank 0" in (p.slots.misfit(adapter("k", module="k_proj")) or "")
    with pytest.raises(ServingError, match="max_loras"):
        check_runtime(None)
