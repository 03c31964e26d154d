"""FSDP2 for the one training loop: shard the model over the workers, clip, gather and re-shard state.

``training.parallel.strategy: fsdp`` (:mod:`lmforge.config.parallel`) makes :func:`lmforge.train.loop.train_phase`
call :func:`shard` where it would wrap the objective in DDP: PyTorch FSDP2's ``fully_shard`` on each
Transformer block, then on the objective as the root, over a 1-D device mesh of the Ray Train
workers' process group (gloo on CPUs, NCCL on GPUs). The root is the objective, not the model:
the fused loss reads the output layer's weight inside the objective's forward, outside the
model's own, so the root's weights (embeddings, final norm, output layer) must be gathered there.
The optimizer is built on the sharded parameters (DTensors) afterwards, so its state is sharded too.

A sharded run's saved model holds full (gathered) tensors: :func:`full_state` gathers them one tensor
at a time (only one full tensor is on the device at once), so it is a plain transformers directory,
as under DDP. Its checkpoints are sharded, each worker writing its own shards
(:mod:`lmforge.train.sharded_checkpoint`); a full checkpoint (DDP's, one worker's) resumes into it
through :func:`local_shard`, which cuts a full tensor into this worker's shard. So a checkpoint resumes
on any number of workers, and with either strategy.

``training.parallel.tensor_parallel`` first splits the blocks over a 2-D mesh's second dimension
(:mod:`lmforge.train.tensor_parallel`); FSDP2 then shards over its first, or (strategy ddp, one
tensor-parallel group) nothing more is done. The functions below handle those DTensors as FSDP2's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.train import tensor_parallel
from lmforge.train.accel.speed import transformer_blocks

if TYPE_CHECKING:
    from lmforge.config.training import TrainingConfig


def sharding(training: TrainingConfig) -> bool:
    """Whether this run's loop shards with FSDP2 or tensor parallelism (strategy fsdp or tensor_parallel > 1,
    inside a process group): then its parameters are DTensors, and no DDP wraps the model."""
    split = training.parallel.strategy == "fsdp" or training.parallel.tensor_parallel > 1
    return split and dist.is_available() and dist.is_initialized()


def shard(objective: torch.nn.Module, model: torch.nn.Module, training: TrainingConfig, device: torch.device) -> bool:
    """With :func:`sharding`, ``fully_shard`` each of ``model``'s Transformer blocks, then ``objective``
    (which holds ``model``) as the root, in place; returns whether it did (False: nothing to do).
    With ``tensor_parallel`` the blocks are split over the mesh's tensor-parallel dimension first, and
    FSDP2 (strategy fsdp) shards over its data-parallel dimension.

    Blocks compiled by ``training.speed`` stay compiled (FSDP2's hooks run outside their graphs), and
    gradient checkpointing recomputes a block inside its own gather.
    """
    if not sharding(training):
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if tensor_parallel.degree(training) > 1:
        tensor_parallel.check_group(training)
        grid = tensor_parallel.mesh(training, device)
        tensor_parallel.parallelize(model, grid[tensor_parallel.TP], training.parallel.sequence_parallel)
        if training.parallel.strategy != "fsdp":
            return True
        mesh = grid[tensor_parallel.DP]
    else:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=(tensor_parallel.DP,))
    # bf16 gathers and compute halve the all-gather and the matrix products' cost; gradients are
    # reduced and kept in float32, as are the shards the optimizer updates. CPUs compute in float32.
    fsdp = training.parallel.fsdp
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if fsdp.mixed_precision and device.type == "cuda" else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward, mp_policy=precision,
                    offload_policy=offload)
    # The root's weights are needed again at once by the backward: FSDP2 keeps them gathered after its forward.
    fully_shard(objective, mesh=mesh, mp_policy=precision, offload_policy=offload)
    # But a validation forward has no backward to reshard them: done here, so that the parameters are the
    # shards again for what reads them next (a checkpoint, the early-stopping copy, the next phase's gather).
    objective.register_forward_hook(_reshard_without_grad)
    return True


def _reshard_without_grad(module: torch.nn.Module, args: object, output: object) -> None:
    if not torch.is_grad_enabled():
        module.reshard()  # type: ignore[operator]  # fully_shard made the module an FSDPModule


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for plain and sharded (DTensor) gradients; returns the global
    norm before clipping as a plain tensor (a sharded one comes back as a DTensor: gathered here).

    Under tensor parallelism the gradients mix plain tensors (replicated weights), DTensors of the
    tensor-parallel mesh and, with FSDP2, of the 2-D and the data-parallel mesh: one norm per kind
    (a foreach norm takes one), then their root sum of squares."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def adamw_kernels(params: list[torch.nn.Parameter], device: torch.device) -> dict[str, Any]:
    """AdamW's kernel flags for ``params``: fused on CUDA, unless plain tensors and DTensors mix.

    A fused (or foreach) step is one call over all parameters, and DTensor refuses plain tensors in it;
    tensor parallelism without FSDP2 leaves the embeddings and norms plain. Those runs step one tensor at
    a time (FSDP2 makes every parameter a DTensor: meshes may differ, kinds do not mix)."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    fast = device.type == "cuda" and len(kinds) <= 1
    return {"fused": fast, "foreach": None if fast else False}


def full_state(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Host copies of full tensors for ``tensors``: sharded ones gathered from all workers, one at a time.

    Every worker must call it (the gathers are collective) with the same names; ``keep: false``
    takes part without keeping anything (an empty dict): where only one worker writes the result.
    """
    from torch.distributed.tensor import DTensor

    full: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            local = tensor.to_local()
            if local.device.type == "cpu" and dist.get_backend() == "nccl":
                # Offloaded shards live on the host, and NCCL gathers device memory only.
                tensor = DTensor.from_local(local.cuda(), tensor.device_mesh, tensor.placements,
                                            shape=tensor.shape, stride=tensor.stride())
            tensor = tensor.full_tensor()
        if keep:
            full[name] = tensor.detach().to("cpu", copy=True)
    return full


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This worker's shard of ``full`` laid out as the sharded ``like`` (``full`` itself where ``like`` is plain).

    Every worker holds ``full`` (each read the checkpoint), so each cuts its own piece: no communication.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(full, DTensor):
        return full
    return distribute_tensor(full.to(device=like.to_local().device, dtype=like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this worker holds: its shards under FSDP2, everything otherwise."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
