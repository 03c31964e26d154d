"""Make a model train faster without changing what it computes: each measure on its own switch.

Used by the engine (:mod:`lmforge.train.run`) and measured one by one in ``bench/train_gpu.py``:
gradient checkpointing (memory for compute), frozen weights kept in bf16 on GPUs (an adapter's base
is never updated, so it needs no float32 master copy and no per-step cast), and ``torch.compile``
of each Transformer block ("regional" compilation: the blocks are identical, so one compiled graph
serves them all and compile time does not grow with depth).
"""

from __future__ import annotations

import torch

# Methods whose frozen base sits inside ordinary linear layers: bf16 storage is safe under autocast.
BF16_FROZEN_METHODS = ("lora", "ia3", "adapter")


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant: works with adapters)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def freeze_to_bf16(model: torch.nn.Module) -> int:
    """Store every frozen floating-point parameter in bf16; returns how many elements moved."""
    moved = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)
            moved += param.numel()
    return moved


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks: the first ModuleList of same-typed Layer/Block modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(child).__name__ for child in module}
            if len(kinds) == 1 and any(word in next(iter(kinds)) for word in ("Layer", "Block")):
                return list(module)
    return []


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` each Transformer block in place; returns how many were compiled."""
    blocks = transformer_blocks(model)
    # Blocks share one graph, but a block that trips a guard recompiles; past the limit dynamo
    # silently runs the rest eagerly, so allow one graph per block rather than lose speed unseen.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks) + 8)
    for block in blocks:
        block.compile()
    return len(blocks)


def enable_tf32() -> None:
    # Matrix products left in float32 (outside autocast) may use TF32 tensor cores.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
