"""Make a model train faster without changing what it computes: each measure on its own switch.

Used by the engine (:mod:`lmforge.train.worker`) and measured one by one in ``bench/train_gpu.py``:
gradient checkpointing (memory for compute), frozen weights kept in bf16 on GPUs (an adapter's base
is never updated, so it needs no float32 master copy and no per-step cast), ``torch.compile`` of
each Transformer block ("regional" compilation: the blocks are identical, so one compiled graph
serves them all and compile time does not grow with depth) or of the whole objective (model and
loss in one graph: ``training.speed.compile_scope: model``), and the choice of SDPA attention kernel.
Each measure is a switch of ``training.speed`` (:class:`~lmforge.config.training.SpeedConfig`), the
only part of the config this module reads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from lmforge.config.training import SpeedConfig
from lmforge.core.errors import ConfigError
from lmforge.train.accel.devices import require_gpu

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

# Methods whose frozen base sits inside ordinary linear layers: bf16 storage is safe under autocast.
BF16_FROZEN_METHODS = ("lora", "ia3", "adapter")


def enable_gradient_checkpointing(model: CausalLM) -> None:
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


def compiles_blocks(speed: SpeedConfig) -> bool:
    """Whether the engine compiles block by block (the whole-objective scope compiles in the loop)."""
    return speed.compile and speed.compile_scope == "blocks"


def attention_kernels(backend: str, device: torch.device) -> AbstractContextManager[Any]:
    """A context that puts one SDPA kernel family first on CUDA.

    ``auto`` means cuDNN's attention on Hopper (compute capability 9.x), where bench/train_gpu.py
    measured it faster than flash attention (GPT-2 124M +10%, Llama 1.1B +2-3% on an H100), and
    torch's own order elsewhere. The other kernels stay allowed, in torch's order, as fallbacks for
    shapes (masks, head sizes) the first one refuses.
    """
    if device.type != "cuda" or backend == "fa4":  # fa4 replaces SDPA in the model (set_attention_backend)
        return nullcontext()
    if backend == "auto":
        backend = "cudnn" if torch.cuda.get_device_capability(device)[0] == 9 else ""
    if not backend:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    return sdpa_kernel([first] + [b for b in order if b != first], set_priority=True)


def set_attention_backend(model: CausalLM, backend: str, device: torch.device) -> None:
    """Route the model's attention through FlashAttention-4 for ``fa4``; other backends choose inside SDPA."""
    if backend != "fa4":
        return
    from lmforge.train.accel import flash4

    flash4.check_available(device)
    config = model.config
    flash4.check_head_dim(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads, device)
    dropout = [p for key in ("attn_pdrop", "attention_dropout") if (p := getattr(model.config, key, 0.0))]
    if dropout:
        raise flash4.dropout_error(dropout[0])
    flash4.use_flash4(model)


_RESIDUAL_HOOKS = "_lmforge_residual_hooks"  # the model's embedding hooks, removed by restore_residual


def cast_residual(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Make every embedding layer return ``dtype``; returns how many layers were hooked.

    Under autocast the products already run in bf16, but the embeddings return float32 and each
    block adds its bf16 output to that float32 sum, so the residual stream, and every norm,
    residual add and their gradients, move float32 through memory. Starting it in bf16 keeps it
    there (bf16 + bf16 stays bf16) and halves that traffic; norms still compute in float32
    inside. GPT-2 adds two embeddings (tokens, positions), so every ``nn.Embedding`` is hooked.
    """
    restore_residual(model)  # hooked once, however often it is asked
    hooks = []

    def cast(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype) if output.is_floating_point() else output

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            hooks.append(module.register_forward_hook(cast))
    setattr(model, _RESIDUAL_HOOKS, hooks)
    return len(hooks)


def restore_residual(model: torch.nn.Module) -> None:
    """Undo :func:`cast_residual` (before a probe or save outside autocast)."""
    for hook in getattr(model, _RESIDUAL_HOOKS, []):
        hook.remove()
    setattr(model, _RESIDUAL_HOOKS, [])


def apply_settings(model: CausalLM, speed: SpeedConfig, device: torch.device) -> None:
    """Attention kernels, FP8 layers, the residual's dtype, gradient checkpointing and block
    compilation, as ``training.speed`` asks (the engine's base model, QLoRA's reloaded one, and
    bench.train.gpu's engine rows)."""
    set_attention_backend(model, speed.attention_backend, device)
    if speed.residual_dtype == "bfloat16":
        if device.type != "cuda":  # the loop autocasts on CUDA only; float32 norms would meet bf16 inputs
            raise ConfigError(f"training.speed.residual_dtype: bfloat16 needs bf16 autocast, which runs on CUDA "
                              f"only (this is {device.type})", "set training.speed.residual_dtype: float32")
        cast_residual(model, torch.bfloat16)
    if speed.fp8:
        from lmforge.train.accel import fp8

        fp8.check_available(device)
        fp8.enable(model)
    if speed.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if compiles_blocks(speed):
        compile_blocks(model)


def check_loss_kernel(kernel: str, device: torch.device) -> None:
    """Refuse ``training.loss.kernel: liger`` where it cannot run, before any step."""
    if kernel == "liger":
        require_gpu(device, "training.loss.kernel: liger", lambda cc: True, "runs only on CUDA GPUs (its kernels are "
                    "Triton)", "set training.loss.kernel: torch (the same fused loss in plain torch)",
                    "liger_kernel.transformers.functional", "pip install 'lmforge[gpu]' (or liger-kernel)")
