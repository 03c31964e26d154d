"""Tensor and sequence parallelism (PyTorch DTensor) for llama-type blocks, alone or under FSDP2 on a 2-D mesh.

``training.parallel.tensor_parallel: N`` (:mod:`lmforge.config.parallel`) makes :func:`lmforge.train.parallel.shard`
call :func:`parallelize` before FSDP2: the workers form a device mesh ``data_parallel_shard x tensor_parallel``
(ranks ``d*N .. d*N+N-1`` are one tensor-parallel group), and every Transformer block gets Megatron's plan
through ``parallelize_module``: q/k/v and gate/up split by output columns, o and down by input rows, so
each worker computes ``heads/N`` whole attention heads and ``1/N`` of the MLP, and one all-reduce per
attention and per MLP joins the partial outputs. Transformers' llama attention reshapes its projections
with ``-1`` heads, so the smaller local projections need no change to the model's code.

``sequence_parallel`` is torchtitan's plan: between the attention and the MLP, the residual stream and
the norms hold ``1/N`` of the sequence (DTensors sharded on dim 1); the sequence is gathered before
the projections and reduce-scattered after them (the same bytes on the wire as the all-reduce). The
embeddings, the final norm and the output layer stay whole on every worker (the fused loss reads the
output layer's weight directly): the embedding's output is cut into sequence shards, and the final
norm gathers them back.

Every worker of a tensor-parallel group sees the same batch (:func:`data_rank`), so the replicated
weights get the same gradients on all of them; only the data-parallel dimension averages gradients.
The loop's loss scale needs no change: its all-reduced target count counts each batch N times, and so
does its world size; the loop counts the tokens seen once per group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lmforge.config.parallel import tensor_parallel_workers_message
from lmforge.core.errors import ConfigError
from lmforge.train.accel.speed import transformer_blocks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ParallelStyle
    from transformers import PreTrainedConfig

    from lmforge.config.training import TrainingConfig

DP, TP = "data_parallel_shard", "tensor_parallel"


def degree(training: TrainingConfig) -> int:
    """The tensor-parallel group size this run uses (1: none, or no process group)."""
    initialized = dist.is_available() and dist.is_initialized()
    return training.parallel.tensor_parallel if initialized else 1


def data_rank(training: TrainingConfig) -> tuple[int, int]:
    """(rank, size) of this worker along the data-parallel dimension: the batch stream's shard.

    The ranks of one tensor-parallel group are consecutive (the mesh's last dimension), so they share one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    tp = degree(training)
    return dist.get_rank() // tp, dist.get_world_size() // tp


def check_group(training: TrainingConfig) -> None:
    """ConfigError unless the process group splits into tensor-parallel groups as the config says.

    Config time checks ``placement.num_workers``; this checks the group that exists (a cluster may start another count)."""
    tp = degree(training)
    if tp == 1:
        return
    world, strategy = dist.get_world_size(), training.parallel.strategy
    if world % tp or (strategy == "ddp" and world != tp):
        cause, _, fix = tensor_parallel_workers_message(world, tp, strategy).partition(": set ")
        raise ConfigError(cause, "set " + fix)


def check_model(training: TrainingConfig, config: PreTrainedConfig) -> None:
    """ConfigError unless the tensor-parallel plan can split the model ``config`` describes (type, head counts)."""
    heads = config.num_attention_heads
    problem = training.parallel.model_problem(config.model_type, heads,
                                              getattr(config, "num_key_value_heads", None) or heads)
    if problem is not None:
        raise ConfigError(*problem)


def mesh(training: TrainingConfig, device: torch.device) -> DeviceMesh:
    """The 2-D device mesh ``(data_parallel_shard, tensor_parallel)`` over the whole process group."""
    from torch.distributed.device_mesh import init_device_mesh

    tp = degree(training)
    return init_device_mesh(device.type, (dist.get_world_size() // tp, tp), mesh_dim_names=(DP, TP))


def block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """``parallelize_module``'s plan for one llama decoder block (module names relative to the block)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    columns = {name: ColwiseParallel() for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "mlp.gate_proj", "mlp.up_proj")}
    if not sequence_parallel:
        return {**columns, "self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    # The residual stream stays a sequence-sharded DTensor between the sub-layers (the row-wise outputs
    # are reduce-scattered into it); the attention (called with keywords) and the MLP gather it first.
    return {
        **columns,
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                        desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def parallelize(model: torch.nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Split ``model``'s blocks over ``tp_mesh`` in place (:func:`block_plan`); with ``sequence_parallel``
    the embedding's output is cut into sequence shards and the final norm gathers them back."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module

    plan = block_plan(sequence_parallel)
    for block in transformer_blocks(model):
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        decoder = model.get_decoder()  # type: ignore[operator]  # a transformers PreTrainedModel's accessor
        # Replicate -> Shard(1) is a local slice (no communication); the DTensor keeps the global shape, so the
        # model's positions and causal mask, read from the embeddings' shape, are the whole sequence's.
        parallelize_module(model.get_input_embeddings(), tp_mesh,  # type: ignore[operator]  # as above
                           PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                               use_local_output=False))
        parallelize_module(decoder.norm, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
