"""FlashAttention-4 for training: ``training.speed.attention_backend: fa4`` (Hopper and Blackwell GPUs).

FlashAttention-4 (the ``flash-attn-4`` package, kernels written in CUTLASS's CuTe DSL) has a Hopper
forward and backward that run head dimension 64, GPT-2's, much faster than SDPA's kernels
(``bench/attention_gpu.py`` measures them side by side). Its Python entry point is an
``autograd.Function`` full of kernel-compilation code that ``torch.compile`` cannot trace, so a
whole-model graph would break at every layer. Here the forward and the backward kernels are
wrapped as two torch custom ops with shape-only fake versions: the compiler sees one opaque node
per attention call and keeps one graph. The ops are registered as a transformers attention
function (:data:`ATTENTION_NAME`), which any model that dispatches through transformers'
``AttentionInterface`` (GPT-2, Llama, Qwen, Mistral, ...) then uses.

PyTorch's own binding (``torch.nn.attention.activate_flash_attention_impl("FA4")``, which routes
SDPA's flash kernels to the same two functions) would avoid importing FA4's private entry points,
but on an H100 it failed with flash-attn-4 4.0.0b40: torch 2.11's binding unpacks two values from
``_flash_attn_fwd``, which now returns more (``ValueError: too many values to unpack``, 2026-12-06).
The ops below take ``out, lse, *_`` and keep working across those releases.

Nothing here imports ``flash_attn`` until a kernel runs, so the module loads on any machine;
:func:`check_available` refuses the backend, with the fix, where it cannot run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmforge.core.errors import ConfigError
from lmforge.train.accel.devices import require_gpu

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

ATTENTION_NAME = "lmforge_fa4"
_BEFORE = "_lmforge_attn_before_fa4"  # the model's attention before use_flash4 (on the module: never saved)
INSTALL = "pip install 'flash-attn-4' 'nvidia-cutlass-dsl[cu13]' (the cu13 extra for CUDA 13 builds of torch)"


@torch.library.custom_op("lmforge::fa4_forward", mutates_args=())
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, S, H, D], log-sum-exp [B, H, S] float32) of attention over [B, S, H(kv), D] inputs."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
    # The fake below promises contiguous results; the compiler plans memory on that promise.
    return out.contiguous(), lse.contiguous()


@fa4_forward.register_fake
def _fa4_forward_fake(q, k, v, causal, scale):
    batch, seq, heads, _ = q.shape
    return q.new_empty(batch, seq, heads, v.shape[-1]), q.new_empty(batch, heads, seq, dtype=torch.float32)


@torch.library.custom_op("lmforge::fa4_backward", mutates_args=())
def fa4_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`fa4_forward`, from its saved output and log-sum-exp."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out, lse, scale, causal)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@fa4_backward.register_fake
def _fa4_backward_fake(grad_out, q, k, v, out, lse, causal, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


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
    # SDPA is on autocast's list and gets one dtype for all three; a custom op is not, and rotary
    # embeddings in float32 leave q and k wider than v, so cast as autocast would have.
    kind = query.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else value.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"training.speed.attention_backend: fa4 runs in bf16 or fp16, but attention got {dtype}",
                          "train on the GPU with autocast (the engine's default there), or set "
                          "training.speed.attention_backend: auto")
    # [B, H, S, D] -> [B, S, H, D] is a view: the kernels read strided rows, nothing is copied.
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    out, _ = fa4_forward(q, k, v, causal, scale)
    return out, None


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
    """Make ``model`` (a transformers model) run its attention through the FlashAttention-4 ops."""
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
    """The attention the model had before :func:`use_flash4` (saved models and serving use it)."""
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        model.set_attn_implementation(getattr(model, _BEFORE, None) or "sdpa")
