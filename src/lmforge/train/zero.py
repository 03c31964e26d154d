"""DeepSpeed ZeRO (stage 2 or 3) for the one training loop: the engine, its step, and full-tensor state.

``training.parallel.strategy: deepspeed`` (:class:`lmforge.config.parallel.DeepSpeedConfig`) makes
:func:`lmforge.train.loop.train_phase` hand its objective and its torch AdamW to :func:`wrap`, which returns
DeepSpeed's engine over them. The DeepSpeed JSON is generated here (:func:`deepspeed_config`) from the phase
and our config; users never write it. Choices that keep DeepSpeed free of compiled ops (it JIT-compiles them
with a C++/CUDA toolchain, which a bare GPU machine may lack): the optimizer is ours (torch's AdamW, also on
the CPU when the optimizer is offloaded: ``zero_force_ds_cpu_optimizer: false``), and on CPUs its shared-memory
all-reduce op is not built (gloo does the collectives). The engine joins the process group the Ray Train worker
already has (``deepspeed.init_distributed`` then only wraps it).

The loop keeps its shape: each micro-batch's loss goes to :func:`backward` (ZeRO reduces the gradients into
their partitions), and once per step the update :func:`wrap` returns clips and steps (``managed_gradient_accumulation:
false``: the step is ours, not a micro-batch count's). Gradients are summed over ranks as DDP's are: the loop
scales each loss by the world size, and ZeRO averages.

Checkpoints and the saved model hold full tensors, as under fsdp (:mod:`lmforge.train.parallel`):
:func:`trainable_state` and :func:`optimizer_state` gather ZeRO's fp32 master weights and AdamW moments
parameter by parameter into the layout of :mod:`lmforge.train.checkpoint` (a torch AdamW's state_dict), so a
deepspeed checkpoint resumes under ddp or fsdp, on any number of workers. Without an engine both fall back to
the checkpoint module's own functions.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.core.errors import ConfigError
from lmforge.train import checkpoint as ckpt

if TYPE_CHECKING:
    from lmforge.config.training import PhaseConfig, TrainingConfig

INSTALL = "pip install 'lmforge[deepspeed]'"
# The parameters of each wrapped client optimizer, in its param groups' order, before ZeRO replaced them by flat
# partitions: the indices a torch AdamW's state_dict (and so a checkpoint) counts in.
_PARAMS: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[list[torch.nn.Parameter]]] = weakref.WeakKeyDictionary()
_ZERO: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()  # client -> ZeRO optimizer
MOMENTS = ("exp_avg", "exp_avg_sq")


def enabled(training: TrainingConfig) -> bool:
    """Whether this run's loop steps through DeepSpeed ZeRO (strategy deepspeed)."""
    return training.parallel.strategy == "deepspeed"


def require(training: TrainingConfig) -> None:
    """ConfigError naming the install command when the run asks for deepspeed and it is not installed: on the
    driver before any work (:func:`lmforge.train.launch.check_inputs`) and on each worker."""
    if enabled(training) and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("training.parallel.strategy is deepspeed, and the deepspeed package is not installed "
                          "(on the driver or a Ray worker)",
                          f"{INSTALL} on every node (no compiled op is needed), or set parallel.strategy: fsdp "
                          "(PyTorch's own sharding, installed with torch)")


def deepspeed_config(training: TrainingConfig, phase: PhaseConfig, world: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON of one phase: its micro-batch and accumulation, our clipping, bf16 on GPUs (fp32 master
    weights in the optimizer) or fp32 on CPUs, and ZeRO's stage, offload and buckets from ``parallel.deepspeed``."""
    ds = training.parallel.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": ds.overlap_comm and on_gpu,
                            "reduce_bucket_size": ds.bucket_size, "contiguous_gradients": True}
    if ds.stage == 2:
        zero.update(allgather_bucket_size=ds.bucket_size, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size=ds.bucket_size, stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": phase.batch_size,
        "gradient_accumulation_steps": phase.grad_accum,
        "train_batch_size": phase.batch_size * phase.grad_accum * world,
        # The loop calls step() once per optimizer step, after all of its micro-batches' backward passes.
        "managed_gradient_accumulation": False,
        "gradient_clipping": training.optimizer.grad_clip,
        "bf16": {"enabled": on_gpu},
        "zero_optimization": zero,
        # Our torch AdamW steps on the host when offloaded: DeepSpeedCPUAdam would need its op compiled.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def wrap(net: torch.nn.Module, optimizer: torch.optim.Optimizer, phase: PhaseConfig, training: TrainingConfig,
         device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]] | None:
    """(DeepSpeed's engine over ``net``, the objective holding the model, and our ``optimizer``; the step's update
    through it), or None when the run is not deepspeed. The optimizer stays the one the loop's schedule drives:
    ZeRO steps it on its fp32 partitions, reading the learning rate from its param groups."""
    if not enabled(training):
        return None
    require(training)
    if training.validation.early_stopping_patience:  # its best weights would go back into the module, not ZeRO's masters
        raise ConfigError("training.validation.early_stopping_patience restores the best weights, which is not built "
                          "for parallel.strategy: deepspeed yet", "set early_stopping_patience: 0, or use "
                          "parallel.strategy: fsdp")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _skip_shared_memory_op()
    # DeepSpeed reads the local rank from the environment (its launcher's or torchrun's; Ray Train sets it too);
    # a group started by hand on one node has rank = local rank.
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() if dist.is_initialized() else 0))
    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if device.type == "cuda" else "gloo")
    deepspeed.init_distributed(dist_backend=backend)  # the worker's group exists: DeepSpeed only wraps it
    world = dist.get_world_size()
    _PARAMS[optimizer] = [list(group["params"]) for group in optimizer.param_groups]
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer,
                                      config=deepspeed_config(training, phase, world, device.type == "cuda"))
    _ZERO[optimizer] = engine.optimizer
    return engine, _step(engine)


def _skip_shared_memory_op() -> None:
    # DeepSpeed's TorchBackend builds a C++ shared-memory all-reduce (for inference on CPUs) at init when its table
    # of compatible ops allows it; filling that table probes a compiler for every op (minutes on a busy machine).
    # Our collectives are the process group's (gloo, NCCL): the table, set before its first read, allows nothing.
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def is_engine(net: torch.nn.Module) -> bool:
    return type(net).__name__ == "DeepSpeedEngine"


def backward(net: torch.nn.Module, loss: torch.Tensor) -> None:
    """``loss.backward()``, through the engine when ``net`` is one (ZeRO's reduce hooks, no scaling by the
    accumulation steps: the loop's loss is already the step's share)."""
    if is_engine(net):
        net.backward(loss, scale_wrt_gas=False)  # type: ignore[operator]  # DeepSpeedEngine.backward
    else:
        loss.backward()


def _step(engine: Any) -> Callable[[], torch.Tensor]:
    """The step's update through the engine (clip, AdamW on the partitions, zero the gradients), returning the
    gradient norm before clipping."""

    def update() -> torch.Tensor:
        engine.step()
        norm = engine.get_global_grad_norm()  # a float with the optimizer offloaded, a device tensor without
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32).to(engine.device)

    return update


def _zero_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (:func:`lmforge.train.checkpoint.trainable_state`); under ZeRO their full fp32
    master weights, gathered from the partitions (collective: every rank calls it)."""
    trainable = ckpt.trainable_state(model)
    if not any(_zero_param(p) for p in trainable.values()):
        return trainable
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().to("cpu", copy=True) for name, p in trainable.items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of the optimizer in :func:`lmforge.train.checkpoint.optimizer_state`'s layout; for a client
    optimizer of ZeRO, its AdamW moments gathered into full tensors per parameter (collective)."""
    if optimizer not in _PARAMS:
        return ckpt.optimizer_state(optimizer)
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_moments(_ZERO[optimizer])
    tensors: dict[str, torch.Tensor] = {}
    groups, index = [], 0
    steps = _steps_taken(optimizer)
    for group, params in zip(optimizer.param_groups, _PARAMS[optimizer]):
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(index, index + len(params)))})
        for p in params:
            for key in MOMENTS:
                tensors[f"{index}.{key}"] = safe_get_full_optimizer_state(p, key).detach().to("cpu", copy=True)
            tensors[f"{index}.step"] = torch.tensor(float(steps))
            index += 1
    return tensors, {"param_groups": groups, "scalars": {}}


def _start_states(optimizer: torch.optim.Optimizer) -> None:
    # AdamW makes its states at its first step, which a resumed run has not taken yet: made here for each of ZeRO's
    # fp32 partitions as torch's AdamW would (the step count on the partition's device where the step is fused).
    zero_optimizer = _ZERO[optimizer]
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or zero_optimizer.single_partition_of_fp32_groups
    on_device = any(group.get("fused") or group.get("capturable") for group in optimizer.param_groups)
    for flat in flats:
        state = optimizer.state[flat]
        if "exp_avg" not in state:
            state.update(step=torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                         exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))


def _link_moments(zero_optimizer: Any) -> None:
    # ZeRO 1/2 (0.19) links each parameter to its AdamW moments once, after the first param group's first step,
    # so the moments of the other groups (our no-decay vectors) stay unlinked: linked again here, all groups stepped.
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for low, flat in zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(low, flat, zero_optimizer.optimizer.state)


def _steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's step count: one for all of ZeRO's flat partitions (they step together)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            shards: bool) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """:func:`lmforge.train.checkpoint.capture` for every strategy: under ZeRO full tensors in its ``full`` layout
    (gathered on every rank, kept by rank 0), so the checkpoint resumes under ddp or fsdp on any number of workers."""
    if optimizer not in _PARAMS:
        return ckpt.capture(model, optimizer, shards)
    rng_tensors, rng_meta = ckpt.rng_state()
    weights = trainable_state(model)
    opt_tensors, opt_meta = optimizer_state(optimizer)
    keep = not dist.is_initialized() or dist.get_rank() == 0
    groups = {"model": weights if keep else {}, "optimizer": opt_tensors if keep else {}, "rng": rng_tensors}
    return groups, {"optimizer": opt_meta, "rng": rng_meta}


def restore(saved: ckpt.Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """:func:`lmforge.train.checkpoint.restore`, also into a ZeRO engine: a full-tensor checkpoint (written under
    ddp, deepspeed or pipeline parallelism, on any number of workers) is cut into this run's partitions: the
    weights ZeRO computes with, its fp32 masters, AdamW's moments and step. Every rank calls it."""
    if optimizer not in _PARAMS:
        ckpt.restore(saved, model, optimizer)
        return
    if saved.sharded:
        raise ConfigError("this checkpoint is sharded (written under parallel.strategy: fsdp), and deepspeed loads "
                          "full-tensor checkpoints only", "resume it with parallel.strategy: fsdp (any number of "
                          "workers) or ddp; a deepspeed run resumes from checkpoints of ddp or deepspeed runs")
    _load_weights(model, saved.tensors["model"])
    _load_moments(optimizer, saved.tensors["optimizer"])
    ckpt.set_rng_state(saved.tensors["rng"], saved.state["loop"]["rng"])


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    expected = ckpt.trainable_state(model)
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in expected.items()}  # ZeRO-3's are empty
    if set(expected) != set(state) or any(tuple(state[k].shape) != shape for k, shape in shapes.items()):
        raise ConfigError("the checkpoint's weights do not fit this model (other names or shapes)",
                          "resume with the same model and training.method as the run that wrote it")
    partitioned = [p for p in expected.values() if hasattr(p, "ds_id")]
    # ZeRO-3 gathers each weight, every rank writes the same values and rank 0's go back into the partitions;
    # stage 2's weights are whole replicas, written in place.
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0), torch.no_grad():
        for name, param in expected.items():
            param.data.copy_(state[name].to(param.dtype))
    for name, param in expected.items():  # the fp32 masters the optimizer steps (its own copies)
        safe_set_full_fp32_param(param, state[name].float())


def _load_moments(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """AdamW's moments by parameter (the checkpoint's indices count over our param groups, as ddp's do) into
    ZeRO's flat partitions, and the step count into each of them."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _start_states(optimizer)
    _link_moments(_ZERO[optimizer])
    params = [p for group in _PARAMS[optimizer] for p in group]
    for index, param in enumerate(params):
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, tensors[f"{index}.{key}"].float(), key)
    step = float(tensors["0.step"]) if "0.step" in tensors else 0.0
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Host copies of ``model``'s whole state_dict with full tensors, on every rank (collective): ZeRO-3's
    partitions gathered, trainable weights as ZeRO's fp32 masters; otherwise :func:`lmforge.train.parallel.full_state`."""
    from lmforge.train.parallel import full_state

    params = list(model.parameters())
    if not any(_zero_param(p) for p in params):
        return full_state(model.state_dict())
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None):
        state = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
    masters = trainable_state(model)
    return {name: masters[name].to(value.dtype) if name in masters else value for name, value in state.items()}


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this worker holds: its ZeRO-3 partitions, or :func:`lmforge.train.parallel.local_parameter_bytes`."""
    from lmforge.train.parallel import local_parameter_bytes as held

    params = list(model.parameters())
    if not any(hasattr(p, "ds_tensor") for p in params):
        return held(model)
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in params)
