"""The pre-flight resource check: what a config will cost, against this machine, before any work starts.

``lmforge run`` (the pipeline flow's first step) and ``lmforge train`` call :func:`preflight`: from the
config alone (no model built, no transformers imported) it estimates the parameter count, the training
memory of one worker (weights, gradients, AdamW state and activations for batch_size x seq_len, by
:mod:`lmforge.model.info`'s arithmetic) and the serving memory (weights and KV cache), and compares
them with the memory the run would use here: GPU 0's with ``training.placement.use_gpu``, else the
host's (or the container's limit), shared by every local CPU worker. Far beyond the machine
(:data:`FAIL_FACTOR` times, past any error of the estimate) is a :class:`ConfigError` naming the key
to change; close to it (:data:`WARN_FACTOR`) is a warning. A ``model.base_model`` is not read here
(its size is known once it is loaded; the train stage's ``fit_warning`` checks it then), and a run on
a Ray cluster (``platform.ray_address``) is checked per worker against nothing local.

Time is estimated the same way: the training FLOPs of every phase (6·N + 12·L·h·S per token, times
the tokens its steps see) over an optimistic rate for this machine (:func:`peak_flops`: the GPU's
datasheet peak, or every core at full vector speed), so the estimate is a lower bound: a run that
would take more than :data:`MAX_HOURS` even then (``steps: 1e8`` on a CPU) is refused, naming the
steps key, before anything starts; more than :data:`WARN_HOURS` is a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmforge.config.pipeline import PipelineConfig
from lmforge.config.training import PhaseConfig
from lmforge.core.errors import ConfigError
from lmforge.model.info import GIB, H100_BF16_PEAK, device_budget, estimate_parameters, train_flops_per_token
from lmforge.model.memory import PhaseMemory, Shape, phase_memory
from lmforge.model.parallel_memory import configured_memory

FAIL_FACTOR = 4.0  # the estimate is within a factor of two of measured peaks (bench/train_gpu.py)
WARN_FACTOR = 0.8
CPU_KV_CAP = 1 << 30  # serving's default KV cache on a CPU is at most 1 GiB (serving.kv_cache.memory_mb)
MAX_HOURS = 24 * 90  # a lower bound past a quarter of a year is a typo (steps: 1e8), not a plan
WARN_HOURS = 24 * 7
CPU_CORE_PEAK = 2e11  # FLOP/s of one core at full AVX-512 FMA rate: faster than any real training step


@dataclass(frozen=True)
class Preflight:
    """What the check estimated and what it compared with (bytes); ``warnings`` for the user."""

    params: int
    train_phase: PhaseMemory
    train_bytes: int  # what this machine holds for training: one worker on a GPU, every local worker on a CPU
    serve_bytes: int
    device: str
    device_bytes: int
    train_hours: float = 0.0  # a lower bound: every phase's FLOPs at this machine's peak rate
    warnings: list[str] = field(default_factory=list)


def preflight(config: PipelineConfig, budget: tuple[str, int] | None = None) -> Preflight | None:
    """Estimate ``config``'s memory and compare it with ``budget`` ((name, bytes); default this machine's).

    Returns None when nothing can be estimated from the config (a ``model.base_model``). Raises
    :class:`ConfigError` when training or serving would need far more memory than there is.
    """
    model, training = config.model, config.training
    if model.base_model:
        return None
    params = estimate_parameters(model)
    shape = Shape.from_config(model)
    phases: list[tuple[str, PhaseConfig, str]] = [("pretrain", training.pretrain, "pretrain")]
    if training.method != "pretrain":
        phases.append(("finetune", training.finetune, training.method))
    phases = [p for p in phases if p[1].steps > 0] or phases[:1]
    # One worker's share under training.parallel (ddp: a whole replica; fsdp, tensor parallel: its shards).
    memories = [configured_memory(phase_memory(name, phase, method, shape, params, _trainable(config, params, method),
                                               training, on_gpu=training.placement.use_gpu), shape, params, training)
                for name, phase, method in phases]
    worst = max(memories, key=lambda m: m.total)
    local_workers = 1 if training.placement.use_gpu or config.platform.ray_address else \
        (training.placement.num_workers if training.placement.use_ray else 1)
    device, available = budget or device_budget(training.placement.use_gpu)
    flops = {name: phase.steps * phase.batch_size * phase.grad_accum * phase.seq_len * local_workers
             * train_flops_per_token(params, shape.layers, shape.hidden, phase.seq_len) for name, phase, _ in phases}
    hours = sum(flops.values()) / peak_flops(training.placement.use_gpu, local_workers) / 3600
    result = Preflight(params=params, train_phase=worst, train_bytes=worst.total * local_workers,
                       serve_bytes=_serving_bytes(config, params, shape), device=device, device_bytes=available,
                       train_hours=hours)
    if available and not config.platform.ray_address:
        _check_training(config, result, local_workers)
    if available:
        _check_serving(config, result)
    if not config.platform.ray_address:
        _check_time(config, result, flops)
    return result


def _trainable(config: PipelineConfig, params: int, method: str) -> int:
    if method in ("pretrain", "full"):
        return params
    # Adapter methods train a sliver; LoRA's count on every linear layer bounds the others well enough here.
    shape, r = Shape.from_config(config.model), config.training.lora.r
    kv = shape.hidden * shape.kv_heads // shape.heads
    widths = 4 * shape.hidden + 2 * (shape.hidden + kv) + 3 * (shape.hidden + shape.intermediate)
    return min(params, shape.layers * r * widths)


def _serving_bytes(config: PipelineConfig, params: int, shape: Shape) -> int:
    """Weights (bf16 on a GPU, float32 on a CPU) and the KV cache for the running batch at full length."""
    serving, on_gpu = config.serving, config.training.placement.use_gpu
    width = 2 if on_gpu else 4
    tokens = serving.scheduler.max_batch_size * (serving.scheduler.max_model_len or config.model.max_seq_len)
    kv = tokens * 2 * shape.layers * (shape.hidden * shape.kv_heads // shape.heads) * width
    if serving.kv_cache.memory_mb is not None:
        kv = int(serving.kv_cache.memory_mb * 2**20)
    elif on_gpu:
        kv = 0  # by default the server gives the cache half the GPU memory left after the weights
    else:
        kv = min(kv, CPU_KV_CAP)
    return params * width + kv


def _check_training(config: PipelineConfig, result: Preflight, workers: int) -> None:
    need, have, phase = result.train_bytes, result.device_bytes, result.train_phase
    if need <= WARN_FACTOR * have:
        return
    settings = config.training.pretrain if phase.phase == "pretrain" else config.training.finetune
    per_worker = f" per worker x {workers} workers" if workers > 1 else ""
    cause = (f"training ({phase.phase} phase, {result.params:,} parameters) needs about {_gib(need)}{per_worker} "
             f"(weights {_gib(phase.weights)}, gradients {_gib(phase.gradients)}, optimizer {_gib(phase.optimizer)}, "
             f"activations {_gib(phase.activations)}) but the {result.device} has {_gib(have)}")
    if phase.activations >= phase.weights + phase.gradients + phase.optimizer:
        fix = (f"lower training.{phase.phase}.batch_size (now {settings.batch_size}; raise grad_accum to keep the "
               f"batch) or training.{phase.phase}.seq_len (now {settings.seq_len}), or set "
               "training.speed.gradient_checkpointing: true")
    else:
        fix = (f"train a smaller model: lower model.hidden_size (now {config.model.hidden_size}) or model.num_layers "
               f"(now {config.model.num_layers}), or train an adapter (training.method: lora)")
        if config.training.placement.use_gpu:
            fix += ", or shard it over more GPU workers (training.parallel: `lmforge model info` names what fits)"
    if workers > 1:
        fix += f", or fewer training.placement.num_workers (now {workers})"
    if need > FAIL_FACTOR * have:
        raise ConfigError(cause, fix)
    result.warnings.append(f"{cause}: close to the limit; if it runs out of memory, {fix}")


def _check_serving(config: PipelineConfig, result: Preflight) -> None:
    need, have = result.serve_bytes, result.device_bytes
    if need <= WARN_FACTOR * have:
        return
    cause = (f"serving the model ({result.params:,} parameters) needs about {_gib(need)} for its weights and KV "
             f"cache but the {result.device} has {_gib(have)}")
    fix = (f"lower serving.scheduler.max_batch_size (now {config.serving.scheduler.max_batch_size}) or "
           "serving.kv_cache.memory_mb, set serving.runtime.quantization: int8, or train a smaller model "
           "(model.hidden_size, model.num_layers)")
    if need > FAIL_FACTOR * have:
        raise ConfigError(cause, fix)
    result.warnings.append(f"{cause}: close to the limit; {fix}")


def peak_flops(use_gpu: bool, workers: int) -> float:
    """An optimistic FLOP/s of this machine for ``workers`` training workers: the datasheet bf16 peak of an
    H100 per GPU worker (the fastest card we measure), or every CPU core at :data:`CPU_CORE_PEAK`."""
    if use_gpu:
        return H100_BF16_PEAK * workers
    return CPU_CORE_PEAK * (os.cpu_count() or 1)


def _check_time(config: PipelineConfig, result: Preflight, flops: dict[str, float]) -> None:
    training = config.training
    if result.train_hours <= WARN_HOURS:
        return
    name = max(flops, key=lambda n: flops[n])
    steps = (training.pretrain if name == "pretrain" else training.finetune).steps
    where = "GPU" if training.placement.use_gpu else f"{os.cpu_count() or 1} CPU cores"
    cause = (f"training would take at least {result.train_hours:,.0f} hours on this machine's {where} even at their "
             f"peak rate (training.{name}.steps is {steps:,}, {flops[name]:.2g} FLOPs)")
    fix = f"lower training.{name}.steps, batch_size or seq_len, or train a smaller model"
    if result.train_hours > MAX_HOURS:
        raise ConfigError(cause, fix)
    result.warnings.append(f"{cause}; if that is not what you meant: {fix}")


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"
