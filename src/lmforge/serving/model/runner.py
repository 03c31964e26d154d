"""Our own forward pass of a Llama-family model over the paged KV cache (prefill chunks and decode).

The runner takes the weights of a loaded ``transformers`` model and runs its layers itself: one
fused QKV matmul and one fused gate/up matmul per layer (the fused tensors are the model's storage:
the original modules are re-pointed at slices of them, so no weight is held twice and the model
object stays usable), rotary embeddings from a table precomputed by the model's own rotary module
(so every rope scaling that does not depend on the sequence length is supported), and attention
over the paged cache (``model/ops.py``: PyTorch on CPU, Triton kernels on CUDA). Every token of a step is
in one flat batch, so a decode step for 64 sequences and a prefill chunk of 2,000 prompt tokens
are the same code path; a decode step's shapes depend only on the batch size, which is what lets
``model/graphs.py`` capture it.

Architectures it does not know are served by the HF fallback (``backends/hf.py``); :func:`unsupported`
says why a model is not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.serving.model.kv_cache import PagedKVCache
from lmforge.serving.model.ops import Ops, StepLayout
from lmforge.serving.model.types import LlamaCausalLM, ServedModel
from lmforge.serving.quant.quantize import QuantLinear

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# Rope variants whose frequencies change with the sequence length cannot use a fixed table.
_LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def unsupported(model: ServedModel) -> str | None:
    """Why the runner cannot run ``model`` (None when it can: then it is a :class:`LlamaCausalLM`)."""
    config = model.config
    if type(model).__name__ != "LlamaForCausalLM":
        return f"the paged engine runs Llama models; this is {type(model).__name__}"
    llama = cast(LlamaCausalLM, model)  # checked just above: transformers' LlamaForCausalLM
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the paged engine implements SwiGLU with silu)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    rope_type = getattr(llama.model.rotary_emb, "rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"rope type {rope_type!r} depends on the sequence length"
    size = head_dim(config)
    if size % 2:
        return f"odd head_dim {size}"
    for layer in llama.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not isinstance(mod, (nn.Linear, QuantLinear)):
                return f"layer type {type(mod).__name__} (an unmerged adapter or foreign quantization)"
    return None


def head_dim(config: PreTrainedConfig) -> int:
    """Size of one attention head (``config.head_dim`` when the model sets it)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class FusedLinear:
    """Several linear layers with one input, run as one matmul; the sources now view its storage."""

    def __init__(self, mods: list[nn.Module]) -> None:
        if _all_dense(mods):
            self.impl: Callable[[torch.Tensor], torch.Tensor] = _fuse_dense(mods)
        elif _all_one_quant_type(mods):
            self.impl = type(mods[0]).fuse(mods)
        else:
            raise TypeError(f"cannot fuse {[type(m).__name__ for m in mods]}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)


def _all_dense(mods: list[nn.Module]) -> TypeGuard[list[nn.Linear]]:
    return all(isinstance(m, nn.Linear) for m in mods)


def _all_one_quant_type(mods: list[nn.Module]) -> TypeGuard[list[QuantLinear]]:
    return all(type(m) is type(mods[0]) and isinstance(m, QuantLinear) for m in mods)


def _fuse_dense(mods: list[nn.Linear]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(mods) == 1:
        return mods[0]
    weight = torch.cat([m.weight.data for m in mods])
    has_bias = any(m.bias is not None for m in mods)
    bias = None
    if has_bias:
        bias = torch.cat([m.bias.data if m.bias is not None else weight.new_zeros(m.out_features) for m in mods])
    start = 0
    for m in mods:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if m.bias is not None and bias is not None:  # bias is set whenever any part has one
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return lambda x: F.linear(x, weight, bias)


class TokenAdapters(Protocol):
    """Adapters chosen per token (``adapters/lora_slots.py``: ``LoraSlots``), told each step's cache rows."""

    def select(self, rows: torch.Tensor) -> None: ...


@dataclass
class _Layer:
    # FusedLinears, or LoRA slots' wrappers around them (adapters/lora_slots.py: attach)
    ln1: torch.Tensor
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]
    ln2: torch.Tensor
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


class LlamaRunner:
    """Runs ``model``'s layers over ``cache``; :meth:`forward` returns logits of the wanted tokens."""

    def __init__(self, model: LlamaCausalLM, cache: PagedKVCache, ops: Ops, max_len: int) -> None:
        reason = unsupported(model)
        if reason:
            raise ValueError(reason)
        config = model.config
        inner = model.model
        self.cache = cache
        self.ops = ops
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = head_dim(config)
        self.scale = self.head_dim**-0.5
        self.eps = float(config.rms_norm_eps)
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head
        self.vocab_size = int(self.embed.shape[0])
        self.layers = [
            _Layer(
                ln1=layer.input_layernorm.weight,
                qkv=FusedLinear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=FusedLinear([layer.self_attn.o_proj]),
                ln2=layer.post_attention_layernorm.weight,
                gate_up=FusedLinear([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=FusedLinear([layer.mlp.down_proj]),
            )
            for layer in inner.layers
        ]
        positions = torch.arange(max_len, device=self.embed.device)[None]
        cos, sin = inner.rotary_emb(self.embed[:1], positions)  # the model's own rope, in its dtype
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        # Per-request LoRA adapters (adapters/lora_slots.py: attach), when serving.adapters is set.
        self.lora: TokenAdapters | None = None
        # Tensor parallelism (model/tensor_parallel.py: shard): sums the ranks' partial outputs of the
        # row-parallel matmuls (attention output, down), in place.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, layout: StepLayout) -> torch.Tensor:
        """Logits ``[K, vocab]`` of the tokens in ``layout.logit_index`` (all tokens when None)."""
        ops, cache, bs = self.ops, self.cache, self.cache.block_size
        positions = layout.positions
        # Decode and verify steps may rotate and store keys inside the attention kernel (one kernel, not two).
        fused = ops.rotates_in_attention(layout)
        slots = None if fused else cache.table[layout.rows, positions // bs].long() * bs + positions % bs
        if self.lora is not None:  # which adapter each token's sequence uses, read by the adapted layers
            self.lora.select(layout.rows)
        x = F.embedding(layout.tokens, self.embed)
        tokens = x.shape[0]
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = ops.add_rms_norm(x, residual, layer.ln1, self.eps)
            if fused:
                attn = ops.rope_attention(layer.qkv(h), self.cos, self.sin, cache.keys[i], cache.values[i], cache.table,
                                          layout, bs, self.heads, self.scale)
            else:
                assert slots is not None  # set whenever the step is not fused
                q = ops.rope_store(layer.qkv(h), self.cos, self.sin, positions, slots, cache.keys[i], cache.values[i],
                                   self.heads, self.kv_heads, self.head_dim)
                attn = ops.attention(q, cache.keys[i], cache.values[i], cache.table, layout, bs, self.scale)
            x = layer.o(attn.reshape(tokens, self.heads * self.head_dim))
            if self.reduce is not None:
                x = self.reduce(x)
            h, residual = ops.add_rms_norm(x, residual, layer.ln2, self.eps)
            x = layer.down(ops.silu_mul(layer.gate_up(h)))
            if self.reduce is not None:
                x = self.reduce(x)
        # Every model has a layer, so the loop left the residual set: a cast, no per-step check.
        residual = cast(torch.Tensor, residual)
        if layout.logit_index is not None:
            x, residual = x[layout.logit_index], residual[layout.logit_index]
        h, _ = ops.add_rms_norm(x, residual, self.norm, self.eps)
        return self.lm_head(h)
