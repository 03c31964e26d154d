"""FlashAttention-4 for training: ``training.speed.attention_backend: fa4`` (Hopper and Blackwell GPUs).

FlashAttention-4 (the ``flash-attn-4`` package, kernels written in CUTLASS's CuTe DSL) has a Hopper
forward and backward that run head dimension 64, GPT-2's, much faster than SDPA's own kernels
(``bench/train/attention.py`` measures them side by side). PyTorch ships the binding: its flash
attention registry (``torch.nn.attention.activate_flash_attention_impl("FA4")``) routes the CUDA
flash-attention kernels behind ``scaled_dot_product_attention`` to FlashAttention-4's forward and
backward. Through SDPA the compiler sees one aten op per attention call and keeps one graph (FA4's
own Python entry point is an ``autograd.Function`` full of kernel-compilation code that
``torch.compile`` cannot trace). :func:`attention` is registered as a transformers attention
function (:data:`ATTENTION_NAME`), which any model that dispatches through transformers'
``AttentionInterface`` (GPT-2, Llama, Qwen, Mistral, ...) then uses; it pins SDPA to the flash
backend, so a shape FlashAttention-4 refuses fails loudly instead of falling back to a slower kernel.

The registry is process-wide: :func:`activate` switches every CUDA flash-attention call of the
process, :func:`deactivate` switches back. Nothing here imports ``flash_attn`` until
:func:`activate`, so the module loads on any machine; :func:`check_available` refuses the backend,
with the fix, where it cannot run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.core.errors import ConfigError
from lmforge.train.accel.devices import require_gpu

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

ATTENTION_NAME = "lmforge_fa4"
_BEFORE = "_lmforge_attn_before_fa4"  # the model's attention before use_flash4 (on the module: never saved)
INSTALL = "pip install 'flash-attn-4' 'nvidia-cutlass-dsl[cu13]' (the cu13 extra for CUDA 13 builds of torch)"
IMPL = "FA4"  # the name of FlashAttention-4 in torch.nn.attention's registry


def activate() -> None:
    """Route SDPA's CUDA flash-attention kernels to FlashAttention-4, for the whole process."""
    from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl

    if current_flash_attention_impl() != IMPL:
        activate_flash_attention_impl(IMPL)


def deactivate() -> None:
    """SDPA's own flash-attention kernels again (after training, before evaluation or serving in-process)."""
    from torch.nn.attention import current_flash_attention_impl, restore_flash_attention_impl

    if current_flash_attention_impl() == IMPL:
        restore_flash_attention_impl()


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: [B, H, S, D] in, ([B, S, H, D], no weights) out."""
    if attention_mask is not None:
        raise ConfigError("training.speed.attention_backend: fa4 takes causal attention without a padding mask, but a "
                          "batch came with left padding or a custom mask",
                          "pack the data (the default) or pad on the right, or set "
                          "training.speed.attention_backend: auto")
    if dropout:
        raise dropout_error(dropout)
    window = kwargs.get("sliding_window")
    if window is not None and window >= key.shape[2]:
        window = None  # a window wider than the sequence is plain causal attention (Mistral's default 4096)
    unsupported = [name for name, value in (("sliding_window", window), ("softcap", kwargs.get("softcap")),
                                            ("s_aux", kwargs.get("s_aux"))) if value is not None]
    if unsupported:  # plain causal attention here: computing it for these models would be silently wrong
        raise ConfigError(f"training.speed.attention_backend: fa4 runs plain causal attention; this model asks for "
                          f"{', '.join(unsupported)}",
                          "set training.speed.attention_backend: auto for this architecture")
    # One dtype for all three: rotary embeddings in float32 leave q and k wider than v.
    kind = query.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else value.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"training.speed.attention_backend: fa4 runs in bf16 or fp16, but attention got {dtype}",
                          "train on the GPU with autocast (the engine's default there), or set "
                          "training.speed.attention_backend: auto")
    q, k, v = (t.to(dtype) for t in (query, key, value))
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        # Grouped-query heads go in as they are: the kernel reads each KV head for its group.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling,
                                             enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).contiguous(), None


def dropout_error(p: float) -> ConfigError:
    return ConfigError(f"training.speed.attention_backend: fa4 has no attention dropout, and the model has {p} "
                       "(model.dropout, or attn_pdrop / attention_dropout in a pretrained base's config.json)",
                       "set model.dropout: 0 (usual for pretraining), set the base's attention dropout to 0 in a "
                       "copy of its config.json, or set training.speed.attention_backend: auto")


def check_head_dim(head_dim: int, device: torch.device) -> None:
    """FA4's kernels take head sizes that are multiples of 8, up to 256 on Hopper and 128 on Blackwell."""
    limit = 256 if torch.cuda.get_device_capability(device)[0] == 9 else 128
    if head_dim % 8 or not 8 <= head_dim <= limit:
        raise ConfigError(f"training.speed.attention_backend: fa4 takes head sizes that are multiples of 8 up to "
                          f"{limit}; "
                          f"this model's is {head_dim}", "set training.speed.attention_backend: auto, or change "
                          "model.hidden_size / model.num_heads")


def check_available(device: torch.device) -> None:
    """Refuse ``attention_backend: fa4`` where its kernels cannot run, naming the fix."""

    require_gpu(device, "training.speed.attention_backend: fa4", lambda cc: cc[0] in (9, 10, 11),
                "runs on Hopper or Blackwell GPUs only", "set training.speed.attention_backend: auto (SDPA's kernels)",
                "flash_attn.cute.interface", INSTALL)


def use_flash4(model: CausalLM) -> None:
    """Make ``model`` (a transformers model) run its attention through :func:`attention` (with
    :func:`activate`, FlashAttention-4's kernels)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, attention)
    # Like flash attention 2: no mask at all for unpadded causal batches (the kernel masks causally).
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, flash_attention_mask)
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        setattr(model, _BEFORE, previous)  # what restore() puts back
    model.set_attn_implementation(ATTENTION_NAME)


def restore(model: CausalLM) -> None:
    """The attention the model had before :func:`use_flash4` (saved models and serving use it), and
    SDPA's own flash kernels again (:func:`deactivate`)."""
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        model.set_attn_implementation(getattr(model, _BEFORE, None) or "sdpa")
    deactivate()
