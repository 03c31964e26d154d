"""Per-worker training memory under each way of sharing the model, and the least a GPU of a given size needs.

``lmforge model info`` shows it beside the one-replica estimate (:func:`lmforge.model.memory.phase_memory`),
which is what ``ddp`` costs each worker. The other strategies (``training.parallel``: :mod:`lmforge.config.parallel`)
divide its parts:

- ``fsdp`` over D workers: weights, gradients and AdamW states / D; each worker also holds the full
  weights of two blocks while they run (the one computing and the one prefetched), in bf16 on GPUs.
  Activations are a worker's own micro-batch's, unchanged.
- ``tensor_parallel`` T (under fsdp over D = N / T groups): the blocks' weights, gradients and states
  / (T·D), the rest (embeddings, final norm, output layer) / D; the blocks' activations as
  :func:`lmforge.model.info.layer_activations` splits them (whole norms and residual without
  ``sequence_parallel``); the logits stay whole on each worker.
- ``deepspeed`` over N workers: ZeRO stage 3 as fsdp (weights, gradients and AdamW states / N, the running blocks
  gathered); stage 2 keeps the whole weights and divides gradients and AdamW states / N. ``offload_optimizer``
  moves the AdamW states to the host (none on the device), ``offload_params`` (stage 3) the weight shards too.
- ``pipeline_parallel`` P (ddp replicas of each stage): the blocks' weights, gradients and states / P, the rest
  (embeddings on the first stage, the output layer on the last) whole on the stage that holds it; activations at
  most one replica's (the first stage keeps P micro-batches in flight, each a fraction of the batch, over 1/P of
  the blocks): an upper bound.

An estimate, like the one-replica figure: no allocator slack, no communication buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lmforge.model.memory import PhaseMemory, Shape, layer_activations, logit_bytes

if TYPE_CHECKING:
    from lmforge.config.training import TrainingConfig

GB = 10 ** 9
DEFAULT_GPU = ("80 GB GPU", 80 * GB)  # an H100 or A100 80 GB: the sentence's GPU when none is visible here
WORKER_COUNTS = tuple(2 ** k for k in range(1, 11))  # fsdp tried on 2, 4, ... 1024 workers
TENSOR_DEGREES = (2, 4, 8)  # within one 8-GPU node, where tensor parallelism's per-block all-reduces belong


@dataclass(frozen=True)
class StrategyMemory:
    """One worker's memory for one phase under one strategy."""

    phase: str
    strategy: str  # ddp | fsdp
    workers: int
    tensor_parallel: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    pipeline_parallel: int = 1
    zero_stage: int = 0  # deepspeed's ZeRO stage (2 or 3); 0 for the other strategies

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def label(self) -> str:
        tp = f", tensor_parallel {self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        tp += f", pipeline_parallel {self.pipeline_parallel}" if self.pipeline_parallel > 1 else ""
        if self.strategy == "ddp":
            return f"ddp{tp}"
        if self.strategy == "deepspeed":
            return f"deepspeed ZeRO-{self.zero_stage}, {self.workers} workers"
        return f"fsdp, {self.workers} workers{tp}"


@dataclass(frozen=True)
class Layout:
    """What :func:`per_worker` needs of the model and the run besides the one-replica estimate."""

    shape: Shape
    block_fraction: float  # share of the parameters in the Transformer blocks (what tensor parallelism splits)
    checkpointing: bool
    fused_loss: bool
    on_gpu: bool


def per_worker(m: PhaseMemory, layout: Layout, strategy: str, workers: int = 1, tensor_parallel: int = 1,
               sequence_parallel: bool = False, pipeline_parallel: int = 1, zero: Zero | None = None) -> StrategyMemory:
    """``m`` (one replica's memory) as each of ``workers`` workers holds it under ``strategy`` (ddp with
    ``tensor_parallel``: one tensor-parallel group, nothing else sharded; with ``pipeline_parallel``: the
    busiest stage's worker; deepspeed with ``zero``'s stage and offloads, stage 3 by default)."""
    if strategy == "deepspeed":
        return _deepspeed(m, layout, workers, zero or Zero())
    if pipeline_parallel > 1:  # the config allows it with ddp and no tensor parallelism only

        def stage(x: int) -> int:
            return int(x * (layout.block_fraction / pipeline_parallel + 1 - layout.block_fraction))

        return StrategyMemory(m.phase, "ddp", workers, 1, stage(m.weights), stage(m.gradients), stage(m.optimizer),
                              m.activations, pipeline_parallel)
    if strategy == "ddp" and tensor_parallel == 1:
        return StrategyMemory(m.phase, "ddp", workers, 1, m.weights, m.gradients, m.optimizer, m.activations)
    groups = workers // tensor_parallel if strategy == "fsdp" else 1
    f = layout.block_fraction

    def shard(x: int) -> int:
        return int(x * (f / (tensor_parallel * groups) + (1 - f) / groups))

    # Two blocks gathered at once (FSDP2 prefetches the next), each as one tensor-parallel shard, bf16 on GPUs.
    block_weights = m.weights * f / layout.shape.layers / tensor_parallel
    gathered = int(2 * block_weights * (0.5 if layout.on_gpu else 1.0)) if groups > 1 else 0
    if tensor_parallel > 1:
        tokens = m.batch_tokens
        activations = int(layer_activations(layout.shape, tokens, layout.checkpointing, tensor_parallel,
                                            sequence_parallel) + logit_bytes(layout.shape, tokens, layout.fused_loss))
    else:
        activations = m.activations
    return StrategyMemory(m.phase, strategy, workers, tensor_parallel, shard(m.weights) + gathered,
                          shard(m.gradients), shard(m.optimizer), activations)


def strategy_table(m: PhaseMemory, layout: Layout, workers: int, tensor_parallel: int,
                   sequence_parallel: bool) -> list[StrategyMemory]:
    """ddp, fsdp and deepspeed ZeRO-2 and ZeRO-3 over ``workers`` (at least 2), and fsdp with ``tensor_parallel``
    (0: no row) over as many or more."""
    workers = max(workers, 2)
    rows = [per_worker(m, layout, "ddp"), per_worker(m, layout, "fsdp", workers),
            per_worker(m, layout, "deepspeed", workers, zero=Zero(stage=2)),
            per_worker(m, layout, "deepspeed", workers, zero=Zero(stage=3))]
    if tensor_parallel > 1:
        tp_workers = workers if workers % tensor_parallel == 0 else workers * tensor_parallel
        rows.append(per_worker(m, layout, "fsdp", tp_workers, tensor_parallel, sequence_parallel))
    return rows


@dataclass(frozen=True)
class Zero:
    """deepspeed's settings that change a worker's memory (``training.parallel.deepspeed``)."""

    stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False


def _deepspeed(m: PhaseMemory, layout: Layout, workers: int, zero: Zero) -> StrategyMemory:
    if zero.stage == 3:  # partitions like fsdp's, gathered block by block
        fsdp = per_worker(m, layout, "fsdp", workers)
        weights = fsdp.weights - (int(m.weights / workers) if zero.offload_params else 0)
    else:
        weights = m.weights
    optimizer = 0 if zero.offload_optimizer else int(m.optimizer / workers)
    return StrategyMemory(m.phase, "deepspeed", workers, 1, weights, int(m.gradients / workers), optimizer,
                          m.activations, zero_stage=zero.stage)


def least_that_fits(m: PhaseMemory, layout: Layout, budget: int, tensor_degrees: tuple[int, ...]) -> StrategyMemory | None:
    """The cheapest way to fit ``budget`` bytes per worker: ddp, else fsdp on the fewest workers, else fsdp with
    the smallest tensor-parallel degree of ``tensor_degrees`` (with sequence parallelism); None if nothing does."""
    candidates = [per_worker(m, layout, "ddp")]
    candidates += [per_worker(m, layout, "fsdp", n) for n in WORKER_COUNTS]
    candidates += [per_worker(m, layout, "fsdp", n, t, True) for t in tensor_degrees for n in WORKER_COUNTS if n >= t]
    return next((c for c in candidates if c.total <= budget), None)


def advice(m: PhaseMemory, layout: Layout, gpu: tuple[str, int], tensor_degrees: tuple[int, ...]) -> str:
    """One sentence: which strategy ``m``'s phase needs on GPUs of ``gpu`` (name, bytes)."""
    name, budget = gpu
    what = {"pretrain": "pretraining", "full": "full fine-tuning"}.get(m.method, f"{m.method} fine-tuning")
    size = f"{budget / GB:.0f} GB"
    fit = least_that_fits(m, layout, budget, tensor_degrees)
    if fit is None:
        return (f"{what} of this model does not fit {size} GPUs with up to {WORKER_COUNTS[-1]} workers at "
                f"{m.batch_tokens} tokens per micro-batch: lower the batch_size (raise grad_accum), or set "
                "training.speed.gradient_checkpointing: true")
    amount = f"{fit.total / GB:.1f} GB" if fit.total >= GB / 10 else f"{fit.total / 1e6:.1f} MB"
    about = f"(about {amount} per worker on the {name})"
    if fit.strategy == "ddp":
        return f"{what} of this model fits one {size} GPU per worker with ddp {about}"
    if fit.tensor_parallel == 1:
        return f"{what} of this model needs fsdp with >= {fit.workers} workers of {size} {about}"
    return (f"{what} of this model needs fsdp with tensor_parallel {fit.tensor_parallel} (sequence_parallel) and "
            f">= {fit.workers} workers of {size} {about}")


def block_fraction(shape: Shape, params: int) -> float:
    """The share of ``params`` in the Transformer blocks, in closed form (llama's block: the pre-flight check
    builds no model; other architectures come out close)."""
    h, kv = shape.hidden, shape.hidden * shape.kv_heads // shape.heads
    return min(1.0, shape.layers * (2 * h * h + 2 * h * kv + 3 * h * shape.intermediate + 2 * h) / params)


def configured_memory(m: PhaseMemory, shape: Shape, params: int, training: TrainingConfig) -> PhaseMemory:
    """``m`` (one replica) as one worker holds it under ``training.parallel`` with ``placement.num_workers``."""
    parallel = training.parallel
    layout = Layout(shape, block_fraction(shape, params), training.speed.gradient_checkpointing, training.loss.fused,
                    training.placement.use_gpu)
    ds = parallel.deepspeed
    mine = per_worker(m, layout, parallel.strategy, training.placement.num_workers, parallel.tensor_parallel,
                      parallel.sequence_parallel, parallel.pipeline_parallel,
                      Zero(ds.stage, ds.offload_optimizer, ds.offload_params))
    return replace(m, weights=mine.weights, gradients=mine.gradients, optimizer=mine.optimizer,
                   activations=mine.activations)
