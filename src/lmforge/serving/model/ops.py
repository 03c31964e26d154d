"""The non-matmul operations of the paged engine's Llama layer, in PyTorch, and the step's layout.

:class:`Ops` is the PyTorch implementation (used on CPU, and as the reference the Triton kernels in
``kernels/layer.py`` are tested against); :class:`TritonOps` has the same methods backed by those kernels.
The rounding of every PyTorch op here is exactly that of ``transformers``' Llama, so on CPU the
engine's greedy tokens equal ``generate()``'s.

A step's tokens are described by :class:`StepLayout`: one flat list of tokens (a decode step has
one per sequence, a prefill chunk many), their positions, the cache row of the sequence each
belongs to, and *query blocks* (runs of consecutive tokens of one sequence) that the attention
kernel takes one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmforge.serving.model.transfer import to_device

if TYPE_CHECKING:
    from lmforge.serving.kernels.decode_attention import SplitPolicy  # imports triton
    from lmforge.serving.kernels.layer import Rope


@dataclass
class StepLayout:
    """Device tensors describing a step's ``T`` tokens; all but the host plan are graph-capturable."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    rows: torch.Tensor  # [T] int64: cache row (block-table row) of each token's sequence
    blk_row: torch.Tensor  # [B] int32: query block -> cache row
    blk_tok: torch.Tensor  # [B] int32: query block -> index of its first token
    blk_n: torch.Tensor  # [B] int32: tokens in the block
    tokens_per_block: int
    logit_index: torch.Tensor | None  # [K] int64 tokens whose logits are wanted; None = all
    plan: list[tuple[int, int, int, int]] | None = None  # host: (row, first token, tokens, kv length) per sequence
    # A decode or verify step, every sequence one query block: no block reads keys that another writes in the
    # same step (a prefill chunk may: a prompt sharing the blocks another prompt of the forward writes), so the
    # attention kernel may rotate and store each block's keys itself (TritonOps.rope_attention).
    decode_step: bool = False
    # The PyTorch attention's gather indices and mask: the same for every layer of a step, built once.
    dense: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def build(cls, items: list[tuple[int, int, list[int]]], device: torch.device, tokens_per_block: int,
              logit_index: list[int] | None, decode: bool = False) -> StepLayout:
        """``items``: (cache row, position of the first token, token ids) per sequence; ``decode``: a decode or
        verify step (a ``decode_step`` when each sequence's tokens fit one block)."""
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        blocks: list[tuple[int, int, int]] = []
        plan: list[tuple[int, int, int, int]] = []
        for row, start, ids in items:
            first = len(tokens)
            tokens.extend(ids)
            positions.extend(range(start, start + len(ids)))
            rows.extend([row] * len(ids))
            plan.append((row, first, len(ids), start + len(ids)))
            for b in range(0, len(ids), tokens_per_block):
                blocks.append((row, first + b, min(tokens_per_block, len(ids) - b)))

        def t64(values: list[int]) -> torch.Tensor:
            return to_device(values, torch.long, device)

        # One row per column (contiguous: a kernel sees only a tensor's data pointer, not its strides).
        blk = to_device([list(column) for column in zip(*blocks)], torch.int32, device)
        return cls(t64(tokens), t64(positions), t64(rows), blk[0], blk[1], blk[2], tokens_per_block,
                   None if logit_index is None else t64(logit_index), plan,
                   decode_step=decode and len(blocks) == len(items))


class Ops:
    """PyTorch versions of the layer's small ops, rounding exactly like transformers' Llama, except RoPE: rotated
    in float32 and rounded once, as the Triton kernel does (the same for float32 models)."""

    name = "torch"
    # An fp8 KV cache holds key / kv_scale (quant/quantize.py); 1.0 keeps Llama keys and values far inside e4m3's range.
    kv_scale = 1.0

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = residual + x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype), x

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int) -> torch.Tensor:
        tokens = qkv.shape[0]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        c, s = cos[positions][:, None, :].float(), sin[positions][:, None, :].float()
        # Rotated in float32 and rounded once, as the Triton kernel does: rounding to bf16 first and then to
        # an fp8 cache's 3-bit mantissa moves ~3% of the stored keys by one fp8 step away from the kernel's.
        q = _rope(q.reshape(tokens, heads, head_dim).float(), c, s).to(qkv.dtype)
        k = _rope(k.reshape(tokens, kv_heads, head_dim).float(), c, s)
        store_kv(k_cache, slots, k, self.kv_scale)
        store_kv(v_cache, slots, v.reshape(tokens, kv_heads, head_dim), self.kv_scale)
        return q

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotates_in_attention(self, layout: StepLayout) -> bool:
        """Whether :meth:`rope_attention` takes this step (host values only: the step may be captured);
        otherwise the runner calls :meth:`rope_store` and :meth:`attention`."""
        return False

    def rope_attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, table: torch.Tensor, layout: StepLayout, block_size: int, heads: int,
                       scale: float) -> torch.Tensor:
        """:meth:`rope_store` and :meth:`attention` in one kernel (only where :meth:`rotates_in_attention`)."""
        raise NotImplementedError(f"the {self.name} ops rotate queries apart (rotates_in_attention is False)")

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                  layout: StepLayout, block_size: int, scale: float) -> torch.Tensor:
        """Dense reference: gather each sequence's keys, pad, and run SDPA with a causal mask."""
        assert layout.plan is not None, "the PyTorch attention needs the host plan"
        tokens, heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        if layout.dense is None:
            layout.dense = _dense_indices(layout, layout.plan, table, block_size, tokens, q.device)
        slots, q_index, mask = layout.dense
        # [S, KV, L, D]: SDPA shares each key/value head among its query group (no repeated copies).
        keys = _load(k_cache, slots, q.dtype, self.kv_scale).transpose(1, 2)
        values = _load(v_cache, slots, q.dtype, self.kv_scale).transpose(1, 2)
        queries = torch.cat([q, q.new_zeros(1, heads, head_dim)])[q_index].transpose(1, 2)  # [S, H, N, D]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None], scale=scale,
                                             enable_gqa=kv_heads != heads)
        flat = q.new_zeros(tokens + 1, heads, head_dim)
        flat[q_index.reshape(-1)] = out.transpose(1, 2).reshape(-1, heads, head_dim)
        return flat[:tokens]


class TritonOps(Ops):
    """The same ops as fused Triton kernels (CUDA); the PyTorch attention needs a host plan, these don't.
    A decode step's attention takes the split-K kernel when ``split`` (a ``SplitPolicy``) says its batch
    is small enough to leave the GPU idle otherwise. ``rope_in_attention``: decode and verify steps rotate
    and store keys inside the attention kernel (off: ``rope_store`` apart, to measure the difference)."""

    name = "triton"

    def __init__(self, split: SplitPolicy | None = None, rope_in_attention: bool = True) -> None:
        from lmforge.serving.kernels import decode_attention
        from lmforge.serving.kernels import layer as kernels  # imports triton

        self._k = kernels
        self._decode = decode_attention
        # When a pure decode step splits its contexts (flash-decoding); None: the default policy.
        self.split = split or decode_attention.SplitPolicy()
        self.rope_in_attention = rope_in_attention

    # Each method has the contract of the same method of Ops.

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.add_rms_norm(x, residual, weight, eps)

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int) -> torch.Tensor:
        return self._k.rope_store(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads, head_dim,
                                  self.kv_scale)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._k.silu_mul(gate_up)

    def rotates_in_attention(self, layout: StepLayout) -> bool:
        # Both attention kernels can, where no query block reads keys another block writes.
        return self.rope_in_attention and layout.decode_step

    def rope_attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, table: torch.Tensor, layout: StepLayout, block_size: int, heads: int,
                       scale: float) -> torch.Tensor:
        return self._attend(self._k.Rope(qkv, cos, sin, heads), k_cache, v_cache, table, layout, block_size, scale)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                  layout: StepLayout, block_size: int, scale: float) -> torch.Tensor:
        return self._attend(q, k_cache, v_cache, table, layout, block_size, scale)

    def _attend(self, q: torch.Tensor | Rope, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                layout: StepLayout, block_size: int, scale: float) -> torch.Tensor:
        """The split-K kernel where the policy splits the step's contexts, else the one-pass kernel."""
        # Few query blocks (decode and verify steps, which graphs capture; a short prefill chunk) are few
        # programs unless their contexts are split. Host shapes only (the step may be captured): the number of
        # blocks and the longest context the table can hold.
        splits = self.split.splits(layout.blk_row.shape[0], k_cache.shape[1], table.shape[1] * block_size,
                                   self._decode.multiprocessors(table.device))
        if splits > 1:
            return self._decode.split_decode_attention(q, k_cache, v_cache, table, layout.positions, layout.blk_row,
                                                       layout.blk_tok, layout.blk_n, layout.tokens_per_block, splits,
                                                       block_size, scale, self.kv_scale, self.split)
        return self._k.paged_attention(q, k_cache, v_cache, table, layout.positions, layout.blk_row,
                                       layout.blk_tok, layout.blk_n, layout.tokens_per_block, block_size, scale,
                                       self.kv_scale)


def _dense_indices(layout: StepLayout, plan: list[tuple[int, int, int, int]], table: torch.Tensor, block_size: int,
                   tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache slots [S, L], query index [S, N] (``tokens`` = padding), causal mask [S, N, L]) of a step
    (``plan``: its ``layout.plan``)."""
    longest = max(n for _, _, n, _ in plan)
    kv_max = max(kv for _, _, _, kv in plan)
    key_pos = torch.arange(kv_max, device=device)
    rows = torch.tensor([row for row, _, _, _ in plan], device=device)
    slots = table[rows][:, key_pos // block_size].long() * block_size + key_pos % block_size  # [S, L]
    q_index = torch.full((len(plan), longest), tokens, dtype=torch.long)
    for i, (_, first, n, _) in enumerate(plan):
        q_index[i, :n] = torch.arange(first, first + n)
    q_index = q_index.to(device)
    q_pos = torch.cat([layout.positions, layout.positions.new_zeros(1)])[q_index]  # [S, N]
    kv_len = torch.tensor([kv for _, _, _, kv in plan], device=device)
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & (key_pos[None, None, :] < kv_len[:, None, None])
    return slots, q_index, mask


def store_kv(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, kv_scale: float) -> torch.Tensor:
    """Write ``x`` into ``cache`` at ``slots`` as the runner does: cast to the cache dtype, an fp8 cache
    scaled by ``1 / kv_scale`` and saturated."""
    if cache.dtype != torch.float8_e4m3fn:
        return cache.index_copy_(0, slots, x.to(cache.dtype))
    q = (x.float() / kv_scale).clamp(-448.0, 448.0).to(cache.dtype)  # saturate, as the Triton kernel does
    return cache.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))  # no fp8 index_copy_ on CPU


def _load(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, kv_scale: float) -> torch.Tensor:
    if cache.dtype != torch.float8_e4m3fn:
        return cache[slots].to(dtype)
    return (cache.view(torch.uint8)[slots].view(cache.dtype).float() * kv_scale).to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
