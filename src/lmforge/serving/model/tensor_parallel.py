"""Tensor parallelism for the paged runner: each of N ranks holds 1/N of every layer's heads and MLP width.

Megatron's split of a Llama block: the fused QKV and gate/up matmuls are column-parallel (rank r keeps
its query heads, its key/value heads and its slice of the MLP width, so attention and SwiGLU run on
local data), the attention-output and down matmuls are row-parallel (their inputs are the rank's
slices, so each rank's product is a partial sum), and one all-reduce after each row-parallel matmul
gives every rank the whole residual again: two per layer. The embedding, the norms and the LM head
stay whole on every rank (small next to the layers at the shapes served). A rank's KV cache holds its
key/value heads only, so N ranks hold N times the tokens of one in the same memory per GPU.

This is the runner's half of ``serving.tensor_parallel``: :func:`shard` cuts a runner that was built
over the whole model, and :func:`drop_whole_layers` then frees the model's own copy of the layers. The
engine's half (worker processes making rank 0's calls in the same order) is ``backends/tensor_parallel.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.serving.model.runner import LlamaRunner, head_dim
from lmforge.serving.model.types import LlamaCausalLM


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group of ``world`` ranks (``group``: a torch.distributed
    process group; None: the default one)."""

    rank: int
    world: int
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def smallest(self, value: int, device: torch.device) -> int:
        """The least of every rank's ``value`` (a collective: every rank calls it at the same point)."""
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def unshardable(model: LlamaCausalLM, world: int) -> str | None:
    """Why ``model`` cannot be split over ``world`` ranks (None when it can)."""
    config = model.config
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    for name, value in (("attention heads", config.num_attention_heads), ("key/value heads", kv_heads),
                        ("MLP width", config.intermediate_size)):
        if value % world:
            return f"{value} {name} do not split over {world} ranks"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for mod in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if type(mod) is not nn.Linear:
                return f"layer type {type(mod).__name__} (quantized or adapted layers are not split yet)"
    return None


def shard(runner: LlamaRunner, model: LlamaCausalLM, tp: TensorParallel) -> None:
    """Cut ``runner`` (built over the whole ``model``, its cache holding ``kv_heads / world`` heads) to
    ``tp.rank``'s slice of every layer, in place, and make it all-reduce after the row-parallel matmuls."""
    reason = unshardable(model, tp.world)
    if reason:
        raise ValueError(reason)
    if runner.lora is not None:
        raise ValueError("unmerged LoRA adapters are not split over tensor-parallel ranks yet")
    size = head_dim(model.config)
    heads, kv_heads = runner.heads // tp.world, runner.kv_heads // tp.world
    if runner.cache.keys.shape[2] != kv_heads:
        raise ValueError(f"the cache holds {runner.cache.keys.shape[2]} key/value heads; rank {tp.rank} of "
                         f"{tp.world} needs {kv_heads}")
    for mine, layer in zip(runner.layers, model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        mine.qkv = _column([(attn.q_proj, heads * size), (attn.k_proj, kv_heads * size),
                            (attn.v_proj, kv_heads * size)], tp.rank)
        mine.o = _row(attn.o_proj, heads * size, tp.rank)
        width = model.config.intermediate_size // tp.world
        mine.gate_up = _column([(mlp.gate_proj, width), (mlp.up_proj, width)], tp.rank)
        mine.down = _row(mlp.down_proj, width, tp.rank)
    runner.heads, runner.kv_heads = heads, kv_heads
    runner.reduce = tp.all_reduce


def drop_whole_layers(model: LlamaCausalLM) -> None:
    """Free the model's own (whole) weights of the layers that :func:`shard` split: the runner holds its
    slices, and keeping the whole ones would cost every rank the full model's memory. The model object
    keeps its embedding, norms and head, but its layers can no longer run a forward of their own."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            mod = cast(nn.Linear, module)  # shard() refused any other type
            weight = mod.weight
            mod.weight = nn.Parameter(weight.new_empty((0, weight.shape[1])), requires_grad=False)
            if mod.bias is not None:
                mod.bias = nn.Parameter(weight.new_empty(0), requires_grad=False)


def _column(parts: list[tuple[nn.Module, int]], rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rank's ``rows``-row slice of each part's output, fused into one matmul (copies: the slices own
    their memory, so the whole weights can be freed)."""
    mods = [(cast(nn.Linear, m), rows) for m, rows in parts]  # unshardable() checked the types
    weight = torch.cat([m.weight.data[rank * rows:(rank + 1) * rows] for m, rows in mods]).contiguous()
    bias = None
    if any(m.bias is not None for m, _ in mods):
        bias = torch.cat([m.bias.data[rank * rows:(rank + 1) * rows] if m.bias is not None
                          else weight.new_zeros(rows) for m, rows in mods])
    return lambda x: F.linear(x, weight, bias)


def _row(module: nn.Module, columns: int, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rank's ``columns``-column slice of ``module``: a partial sum of the output; the bias is added once
    (by rank 0), before the all-reduce sums the ranks' parts."""
    mod = cast(nn.Linear, module)  # unshardable() checked the type
    weight = mod.weight.data[:, rank * columns:(rank + 1) * columns].contiguous()
    bias = mod.bias.data if mod.bias is not None and rank == 0 else None
    return lambda x: F.linear(x, weight, bias)
