"""``training.parallel``: how the Ray Train workers share the model (DDP replicas or FSDP2 shards).

``strategy: ddp`` (the default) keeps a full replica of weights, gradients and optimizer state on
every worker; ``fsdp`` shards all three over the workers (PyTorch FSDP2, ``fully_shard`` per
Transformer block and on the root: :mod:`lmforge.train.parallel`), so the per-worker memory of the
model falls with the number of workers. ``tensor_parallel: N`` splits every Transformer block's matrices
over groups of N workers (PyTorch DTensor, Megatron's column/row plan: :mod:`lmforge.train.tensor_parallel`), with
``sequence_parallel`` also its norms and residual stream along the sequence; with ``fsdp`` the workers form a 2-D mesh
(``data_parallel_shard x tensor_parallel``). ``pipeline_parallel: N`` cuts the model's blocks into N stages, one
per worker of a pipeline (``torch.distributed.pipelining``: :mod:`lmforge.train.pipeline`), the micro-batches
flowing through them by ``pipeline_schedule``; the workers form ``data_parallel x pipeline_parallel``.
A group of :class:`lmforge.config.training.TrainingConfig`,
in a module of its own; its rules that span other groups are :meth:`ParallelConfig.check`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lmforge.config.base import Section
from lmforge.core.runtime import torchrun_world

# Strategies named by the issue that are not built yet: refused with a message, not a bare enum error.
PLANNED: tuple[str, ...] = ()
# Methods DeepSpeed ZeRO partitions (their trainable weights are ordinary parameters); qlora's 4-bit weights are not.
DEEPSPEED_METHODS = ("pretrain", "full", "lora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3")
# Methods FSDP2 shards as it shards full fine-tuning (their extra weights are ordinary parameters of the blocks
# or of the root); qlora's 4-bit weights (bitsandbytes Params4bit) cannot be DTensor shards.
FSDP_METHODS = ("pretrain", "full", "lora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3")
# Tensor parallelism splits the blocks' nn.Linear layers by their llama names (q/k/v/o, gate/up/down);
# an adapter method wraps those layers in its own modules, which the column/row plans cannot split.
TP_METHODS = ("pretrain", "full")
# Model types whose blocks are llama's (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, RMSNorms, heads reshaped by -1).
TP_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Pipeline stages run the blocks of the full fine-tuning model themselves (llama's decoder layers, rotary positions);
# an adapter method's wrapped model and a sharded or split block are other layouts the stage split does not cut.
PP_METHODS = ("pretrain", "full")
PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
VIRTUAL_STAGES = {"1f1b": 1, "gpipe": 1, "interleaved_1f1b": 2}  # stages per worker (interleaved: two, looped)


class FsdpConfig(Section):
    """FSDP2's settings (used when ``strategy: fsdp``)."""

    reshard_after_forward: bool = Field(
        True, description="Free each block's gathered weights after its forward and gather them again for the "
        "backward (ZeRO-3: least memory); false keeps them until the backward (ZeRO-2-like: one all-gather less "
        "per block and step, more memory).",
    )
    cpu_offload: bool = Field(
        False, description="Keep the weight, gradient and optimizer-state shards in host memory; each block's weights "
        "go to the GPU only while it runs, and the optimizer steps on the CPU (much slower; for models that do not "
        "fit otherwise).",
    )
    mixed_precision: bool = Field(
        True, description="On GPUs, gather weights and compute in bf16, reduce gradients in float32, keep float32 "
        "shards (the master weights); on CPUs everything stays float32 whatever this says.",
    )


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO's settings (used when ``strategy: deepspeed``); the DeepSpeed JSON is generated from these and
    the phase (:func:`lmforge.train.zero.deepspeed_config`), never written by hand."""

    stage: Literal[2, 3] = Field(
        3, description="2: gradients and optimizer state partitioned over the workers, weights replicated; 3: the "
        "weights too, gathered layer by layer as they run (least memory).",
    )
    offload_optimizer: bool = Field(
        False, description="Keep the optimizer state (and its step) in host memory: torch's AdamW steps on the CPU "
        "(no compiled DeepSpeed op needed; much slower, for models that do not fit otherwise).",
    )
    offload_params: bool = Field(
        False, description="Stage 3 only: keep the weight partitions in host memory, on the GPU only while a layer runs.",
    )
    overlap_comm: bool = Field(
        True, description="Overlap the gradients' reduction with the backward pass (more memory for buckets).",
    )
    bucket_size: int = Field(
        200_000_000, ge=1_000_000, le=10**10, description="Elements per gradient reduce bucket (and, stage 3, per "
        "prefetch): larger buckets mean fewer, larger messages and more memory.",
    )


class ParallelConfig(Section):
    """How the workers share the model: ``ddp`` replicas, ``fsdp`` shards or DeepSpeed ZeRO partitions."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: a full replica per worker, gradients all-reduced; fsdp: weights, gradients and "
        "optimizer state sharded over the workers (PyTorch FSDP2), gathered block by block as they run; deepspeed: "
        "DeepSpeed ZeRO stage 2 or 3 (parallel.deepspeed; needs pip install 'lmforge[deepspeed]').",
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tensor_parallel: int = Field(
        1, ge=1, le=1024, description="Split each Transformer block's attention heads and MLP columns over groups of "
        "this many workers (DTensor: q/k/v and gate/up column-wise, o and down row-wise); the heads and key/value "
        "heads must divide by it, and placement.num_workers must be a multiple of it (with strategy ddp, equal to it; "
        "with fsdp the other factor shards over the groups). Llama-type models (llama, mistral, qwen2) only.",
    )
    sequence_parallel: bool = Field(
        False, description="With tensor_parallel > 1: the blocks' norms and residual stream are also split, along the "
        "sequence, over the tensor-parallel group (less activation memory; sequences are gathered for attention "
        "and the MLP and scattered after them).",
    )
    pipeline_parallel: int = Field(
        1, ge=1, le=256, description="Cut the model's Transformer blocks into this many stages, one per worker of "
        "a pipeline (embeddings on the first, final norm, output layer and loss on the last); micro-batches flow "
        "through them by pipeline_schedule. placement.num_workers must be a multiple of it (the other factor: "
        "data-parallel replicas of each stage). Llama-type models, methods pretrain and full, with at least as many "
        "blocks as stages.",
    )
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = Field(
        "1f1b", description="1f1b: each stage alternates one forward and one backward once the pipeline is full "
        "(activations of at most pipeline_parallel micro-batches held); interleaved_1f1b: two stages per worker "
        "(looped), a smaller bubble, twice the blocks needed; gpipe: all forwards, then all backwards.",
    )
    pipeline_microbatches: int = Field(
        0, ge=0, le=4096, description="Micro-batches each optimizer step's rows (batch_size x grad_accum per "
        "pipeline) are cut into for the schedule; 0: 2 x the pipeline's stages. Must divide batch_size x grad_accum.",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _not_yet(cls, value: Any) -> Any:
        if value in PLANNED:
            raise ValueError(f"strategy {value!r} is planned but not built yet: use strategy: fsdp (sharded weights, "
                             "gradients and optimizer state, as ZeRO-3) or ddp")
        return value

    def check(self, method: str, use_ray: bool, speed: dict[str, Any], num_workers: int | None = None) -> None:
        """Raise ValueError (the cause and the fix) for a setting of another group FSDP2 cannot run with.

        ``speed`` is ``training.speed`` as a dict (this module cannot import its class: it imports us);
        ``num_workers`` is ``placement.num_workers`` (None: not checked here). The ranks form a group under
        Ray (``use_ray``) or when torchrun started them, and then torchrun's count is theirs (train/torchrun.py)."""
        ranks = torchrun_world()
        grouped, num_workers = use_ray or ranks is not None, ranks or num_workers
        if self.tensor_parallel > 1 or self.sequence_parallel:
            self._check_tensor_parallel(method, grouped, speed, num_workers)
        if self.pipeline_parallel > 1:
            self._check_pipeline(method, grouped, speed, num_workers)
        if self.strategy == "deepspeed":
            self._check_deepspeed(method, grouped, speed)
        if self.strategy != "fsdp":
            return
        if not grouped:
            raise ValueError("parallel.strategy: fsdp shards over the workers' process group, and placement.use_ray "
                             "is false (nor did torchrun start the ranks): set placement.use_ray: true (num_workers: 1 "
                             "shards on one "
                             "device), or parallel.strategy: ddp")
        if method not in FSDP_METHODS:
            raise ValueError(f"parallel.strategy: fsdp cannot shard method {method!r}'s 4-bit weights: use method: lora "
                             "(FSDP2 shards the base, so it needs no 4-bit copy to fit), or parallel.strategy: ddp")
        unsupported = {"cuda_graphs": speed.get("cuda_graphs"), "compile_optimizer": speed.get("compile_optimizer"),
                       "fp8": speed.get("fp8"),
                       "compile_scope: model": speed.get("compile") and speed.get("compile_scope") == "model"}
        for name, on in unsupported.items():
            if on:
                raise ValueError(f"parallel.strategy: fsdp does not run with speed.{name} yet: turn it off (compile "
                                 "with compile_scope: blocks works with fsdp), or use parallel.strategy: ddp")

    def _check_deepspeed(self, method: str, grouped: bool, speed: dict[str, Any]) -> None:
        ds = self.deepspeed
        if not grouped:
            raise ValueError("parallel.strategy: deepspeed partitions over the workers' process group, and "
                             "placement.use_ray is false (nor did torchrun start the ranks): set placement.use_ray: "
                             "true (num_workers: 1 runs ZeRO on one "
                             "device), or parallel.strategy: ddp")
        if method not in DEEPSPEED_METHODS:
            raise ValueError(f"parallel.strategy: deepspeed cannot partition method {method!r}'s 4-bit weights: use "
                             "method: lora (ZeRO-3 partitions the base, so it needs no 4-bit copy to fit), or "
                             "parallel.strategy: ddp")
        if ds.offload_params and ds.stage != 3:
            raise ValueError("parallel.deepspeed.offload_params moves the weight partitions to host memory, which only "
                             "ZeRO stage 3 has: set parallel.deepspeed.stage: 3, or offload_params: false")
        if self.tensor_parallel > 1:
            raise ValueError("parallel.tensor_parallel does not compose with strategy deepspeed: use strategy fsdp with "
                             "tensor_parallel (a 2-D mesh), or tensor_parallel: 1")
        unsupported = {"cuda_graphs": speed.get("cuda_graphs"), "compile_optimizer": speed.get("compile_optimizer"),
                       "fp8": speed.get("fp8"), "compile": speed.get("compile")}
        for name, on in unsupported.items():
            if on:
                raise ValueError(f"parallel.strategy: deepspeed does not run with speed.{name} (DeepSpeed's engine owns "
                                 "the step and its hooks): turn it off, or use parallel.strategy: fsdp")

    def _check_tensor_parallel(self, method: str, grouped: bool, speed: dict[str, Any], num_workers: int | None) -> None:
        tp = self.tensor_parallel
        if tp == 1:
            raise ValueError("parallel.sequence_parallel splits the sequence over the tensor-parallel group, and "
                             "tensor_parallel is 1: set parallel.tensor_parallel: 2 (or more), or sequence_parallel: false")
        if not grouped:
            raise ValueError(f"parallel.tensor_parallel: {tp} splits the blocks over the workers' process group, "
                             "and placement.use_ray is false (nor did torchrun start the ranks): set "
                             "placement.use_ray: true with num_workers: "
                             f"{tp}, or tensor_parallel: 1")
        if method not in TP_METHODS:
            raise ValueError(f"parallel.tensor_parallel splits the blocks' plain linear layers, and method {method!r} "
                             "wraps them in its own: use method pretrain or full with tensor_parallel, or "
                             "tensor_parallel: 1 (parallel.strategy: fsdp shards adapter methods)")
        if num_workers is not None and (num_workers % tp or (self.strategy == "ddp" and num_workers != tp)):
            raise ValueError(tensor_parallel_workers_message(num_workers, tp, self.strategy))
        unsupported = {"cuda_graphs": speed.get("cuda_graphs"), "compile_optimizer": speed.get("compile_optimizer"),
                       "fp8": speed.get("fp8"), "compile": speed.get("compile")}
        for name, on in unsupported.items():
            if on:
                raise ValueError(f"parallel.tensor_parallel does not run with speed.{name} yet: turn it off, or set "
                                 "tensor_parallel: 1")

    def _check_pipeline(self, method: str, grouped: bool, speed: dict[str, Any], num_workers: int | None) -> None:
        pp = self.pipeline_parallel
        if not grouped:
            raise ValueError(f"parallel.pipeline_parallel: {pp} runs its stages on the workers, and "
                             "placement.use_ray is false (nor did torchrun start the ranks): set placement.use_ray: "
                             f"true with num_workers: {pp}, or "
                             "pipeline_parallel: 1")
        if self.strategy != "ddp" or self.tensor_parallel > 1:
            other = "strategy fsdp" if self.strategy != "ddp" else "tensor_parallel"
            raise ValueError(f"parallel.pipeline_parallel does not compose with {other} yet (each stage is replicated, "
                             "not sharded): use pipeline_parallel alone (strategy ddp, "
                             "tensor_parallel 1), or pipeline_parallel: 1")
        if method not in PP_METHODS:
            raise ValueError(f"parallel.pipeline_parallel runs the plain model's blocks in stages, and method {method!r} "
                             "wraps the model in its own: use method pretrain or full with pipeline_parallel, or "
                             "pipeline_parallel: 1 (parallel.strategy: fsdp shards adapter methods)")
        if num_workers is not None and num_workers % pp:
            raise ValueError(f"parallel.pipeline_parallel: {pp} does not divide the {num_workers} workers "
                             f"(placement.num_workers) into pipelines: set placement.num_workers to a multiple of {pp} "
                             "(data_parallel x pipeline_parallel)")
        n = self.microbatches()
        if n < pp or (self.pipeline_schedule == "interleaved_1f1b" and n % pp):
            raise ValueError(f"parallel.pipeline_microbatches: {n} leaves stages of the {self.pipeline_schedule} "
                             f"schedule without work: set it to a multiple of pipeline_parallel ({pp}), at least "
                             f"{2 * pp} (or 0: two per stage)")
        unsupported = {"cuda_graphs": speed.get("cuda_graphs"), "compile_optimizer": speed.get("compile_optimizer"),
                       "fp8": speed.get("fp8"), "compile": speed.get("compile")}
        for name, on in unsupported.items():
            if on:
                raise ValueError(f"parallel.pipeline_parallel does not run with speed.{name} yet: turn it off, or "
                                 "set pipeline_parallel: 1")

    def check_pipeline_rows(self, phase: str, rows: int) -> None:
        """ValueError unless a step's ``rows`` (``batch_size x grad_accum`` of ``phase``) cut into the schedule's
        micro-batches evenly: every micro-batch a stage sends must have one shape."""
        if self.pipeline_parallel > 1 and rows % self.microbatches():
            raise ValueError(f"parallel.pipeline_parallel cuts each step's {rows} rows of {phase} (batch_size x "
                             f"grad_accum) into {self.microbatches()} micro-batches, unevenly: set "
                             f"parallel.pipeline_microbatches to a divisor of {rows} (2 or more per stage keeps the "
                             f"stages busy), or {phase}.batch_size to a multiple of {self.microbatches()}")

    def pipeline_stages(self) -> int:
        """How many stages the model is cut into: pipeline_parallel, twice that for the interleaved schedule."""
        return self.pipeline_parallel * VIRTUAL_STAGES[self.pipeline_schedule]

    def microbatches(self) -> int:
        """Micro-batches per step of the pipeline schedule (``pipeline_microbatches``, or 2 per stage)."""
        return self.pipeline_microbatches or 2 * self.pipeline_stages()

    def model_problem(self, architecture: str, num_heads: int, num_kv_heads: int,
                      num_layers: int | None = None) -> tuple[str, str] | None:
        """(cause, fix) when the tensor-parallel plan or the pipeline's stages cannot split this model, else None:
        checked before the run (:func:`lmforge.train.launch.check_inputs`) and on each worker (a base_model's
        heads and layers are known there). ``num_layers`` None: the pipeline is not checked."""
        if self.pipeline_parallel > 1 and num_layers is not None:
            problem = self._pipeline_model_problem(architecture, num_layers)
            if problem is not None:
                return problem
        tp = self.tensor_parallel
        if tp == 1:
            return None
        if architecture not in TP_ARCHITECTURES:
            return (f"parallel.tensor_parallel splits llama-type blocks ({', '.join(TP_ARCHITECTURES)}), and the model "
                    f"is {architecture!r}", "use one of those architectures, or tensor_parallel: 1 with "
                    "parallel.strategy: fsdp (which shards any model)")
        for name, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if heads % tp:
                fits = [str(n) for n in range(2, num_heads + 1) if num_heads % n == 0 and num_kv_heads % n == 0]
                return (f"parallel.tensor_parallel {tp} does not divide the model's {name} ({heads}): each worker "
                        "computes whole attention heads", f"set parallel.tensor_parallel to a number that divides "
                        f"num_heads ({num_heads}) and num_kv_heads ({num_kv_heads})"
                        + (f": {', '.join(fits)}" if fits else " (none above 1 does: use tensor_parallel: 1)"))
        return None

    def _pipeline_model_problem(self, architecture: str, num_layers: int) -> tuple[str, str] | None:
        stages = self.pipeline_stages()
        if architecture not in TP_ARCHITECTURES:
            return (f"parallel.pipeline_parallel cuts llama-type models ({', '.join(TP_ARCHITECTURES)}) into stages, "
                    f"and the model is {architecture!r}", "use one of those architectures, or pipeline_parallel: 1 "
                    "with parallel.strategy: fsdp (which shards any model)")
        if num_layers < stages:
            schedule = f" ({self.pipeline_schedule}: two per worker)" if stages > self.pipeline_parallel else ""
            return (f"parallel.pipeline_parallel {self.pipeline_parallel} needs {stages} stages{schedule}, and the "
                    f"model has {num_layers} layers: each stage runs at least one", "set parallel.pipeline_parallel "
                    f"to at most {num_layers // (stages // self.pipeline_parallel)}, or give the model more layers "
                    "(model.num_layers)")
        return None


def tensor_parallel_workers_message(workers: int, tp: int, strategy: str) -> str:
    """Why ``workers`` workers cannot form groups of ``tp``, and the fix (config time and the worker's start)."""
    if strategy == "ddp":
        return (f"parallel.tensor_parallel: {tp} with strategy ddp runs one tensor-parallel group, and there are "
                f"{workers} workers (placement.num_workers): set placement.num_workers: {tp}, or parallel.strategy: "
                f"fsdp to shard over several groups of {tp}")
    return (f"parallel.tensor_parallel: {tp} does not divide the {workers} workers (placement.num_workers) into "
            f"groups: set placement.num_workers to a multiple of {tp} (data_parallel_shard x tensor_parallel)")
