"""``training.parallel``: how the Ray Train workers share the model (DDP replicas or FSDP2 shards).

``strategy: ddp`` (the default) keeps a full replica of weights, gradients and optimizer state on
every worker; ``fsdp`` shards all three over the workers (PyTorch FSDP2, ``fully_shard`` per
Transformer block and on the root: :mod:`lmforge.train.parallel`), so the per-worker memory of the
model falls with the number of workers. A group of :class:`lmforge.config.training.TrainingConfig`,
in a module of its own; its rules that span other groups are :meth:`ParallelConfig.check`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lmforge.config.base import Section

# Strategies named by the issue that are not built yet: refused with a message, not a bare enum error.
PLANNED = ("deepspeed",)
# Methods FSDP2 shards as it shards full fine-tuning (their extra weights are ordinary parameters of the blocks
# or of the root); qlora's 4-bit weights (bitsandbytes Params4bit) cannot be DTensor shards.
FSDP_METHODS = ("pretrain", "full", "lora", "adapter", "prefix", "ptuning_v2", "prompt", "ptuning", "ia3")


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


class ParallelConfig(Section):
    """How the workers share the model: ``ddp`` replicas or ``fsdp`` shards."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full replica per worker, gradients all-reduced; fsdp: weights, gradients and "
        "optimizer state sharded over the workers (PyTorch FSDP2), gathered block by block as they run.",
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)

    @field_validator("strategy", mode="before")
    @classmethod
    def _not_yet(cls, value: Any) -> Any:
        if value in PLANNED:
            raise ValueError(f"strategy {value!r} is planned but not built yet: use strategy: fsdp (sharded weights, "
                             "gradients and optimizer state, as ZeRO-3) or ddp")
        return value

    def check(self, method: str, use_ray: bool, speed: dict[str, Any]) -> None:
        """Raise ValueError (the cause and the fix) for a setting of another group FSDP2 cannot run with.

        ``speed`` is ``training.speed`` as a dict (this module cannot import its class: it imports us)."""
        if self.strategy != "fsdp":
            return
        if not use_ray:
            raise ValueError("parallel.strategy: fsdp shards over the Ray Train workers' process group, and "
                             "placement.use_ray is false: set placement.use_ray: true (num_workers: 1 shards on one "
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
