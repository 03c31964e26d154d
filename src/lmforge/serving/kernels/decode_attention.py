"""Split-K ("flash-decoding") paged attention for steps of few query blocks: decode steps (one query
token per block), speculative verify steps (k + 1 tokens per block) and short prefill chunks over a
long cached context.

The one-pass kernel (``layer.py``: ``paged_attention``) runs one program per (query block, KV head)
that walks its sequence's whole context: one decode sequence of a 4-KV-head model is 4 programs on
a 132-SM GPU. Here each block's context is cut into ``splits`` chunks, one program per
(block, KV head, chunk) writes its chunk's partial softmax state (max, sum, unnormalized output) for
each (token, query head) row of the block to a scratch buffer, and a second kernel merges a row's
partials. The rows of a block are its tokens x the KV head's query heads, as in the one-pass kernel;
all share the chunk bounds (from the block's last token), and each masks keys past its own position.
(Merging in the last split program to finish, counted with an atomic, measured slower at one sequence
on an H100: bench/RESULTS.md.)

In decode and verify steps (``StepLayout.decode_step``) the kernel also does ``rope_store``'s work
(``layer.py``: :class:`Rope`): each program rotates its query rows from the QKV output, and writes
the keys and values of the new tokens that fall in its own chunk, which no other program reads. At
one sequence on an H100 a layer's attention is then two kernels instead of three (each kernel of a
captured step costs ~2 us however small).

Decode steps are captured in CUDA graphs, so nothing here reads a device value on the host: the
number of splits comes from host shapes only (:meth:`SplitPolicy.splits`: the batch size and the
cache table's width), and each program finds its chunk on the device from its sequence's length.
The chunk is a whole number of tiles (``cdiv(cdiv(kv_len, splits), BLOCK_N) * BLOCK_N``), so a
short context occupies fewer splits than the grid holds; the programs past it write a neutral
partial (max -1e30, sum 0), which weighs nothing in the merge.

fp8 caches (``kv_scale``) and grouped-query attention are handled as in the one-pass kernel, whose
tile update (``attend_tile``) both share. ``python -m bench.serve.attention`` times the two kernels
against each other and sweeps the split count, to tune :class:`SplitPolicy`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmforge.core.errors import ConfigError
from lmforge.serving.kernels.layer import INTERPRETED, Rope, attend_tile, load_queries, query_source

# An H100 SXM's SMs: the count assumed where no CUDA device is asked (the CPU interpreter).
DEFAULT_SMS = 132


@dataclass(frozen=True)
class SplitPolicy:
    """When and how finely a decode step splits each sequence's context, tuned from
    ``bench.serve.attention``'s sweep (the best split count per batch size and context, recorded next
    to this policy's choice). On an H100 (bench/RESULTS.md), one sequence of 4 KV heads is fastest at
    16 splits up to 1,024 positions (4.4-5.3 us against 5.3-5.7 at 32) and within 0.3 us of 32 at
    2,048; only 4,096-position contexts gain from 32 (7.9 against 9.7 us)."""

    waves: float = 2.0  # programs wanted per step, in multiples of the GPU's SMs
    max_splits: int = 16  # at most this many chunks per sequence (a power of two)
    block_n: int = 32  # cache positions per tile (a power of two, >= 16: tl.dot's smallest side)
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name, value, low in (("max_splits", self.max_splits, 1), ("block_n", self.block_n, 16)):
            if value < low or value & (value - 1):
                raise ConfigError(f"SplitPolicy.{name} is {value}, not a power of two >= {low}",
                                  f"give {name} as a power of two, at least {low}")
        if self.waves <= 0:
            raise ConfigError(f"SplitPolicy.waves is {self.waves}", "give waves > 0 (1 = one program per SM)")

    def splits(self, batch: int, kv_heads: int, max_len: int, sms: int) -> int:
        """Chunks per sequence (a power of two; 1: use the one-pass kernel) for ``batch`` decode tokens
        over a cache whose sequences hold at most ``max_len`` positions, on a GPU of ``sms`` SMs."""
        wanted = self.waves * sms / max(1, batch * kv_heads)
        useful = triton.cdiv(max_len, self.block_n)  # more splits than tiles would all be empty
        splits = 1
        while splits * 2 <= min(wanted, self.max_splits, useful):
            splits *= 2
        return splits


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA device (host property, asked once); ``DEFAULT_SMS`` elsewhere."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _chunk(kv_len, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions per split: ``kv_len / SPLITS`` rounded up to whole tiles."""
    return tl.cdiv(tl.cdiv(kv_len, SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def split_kernel(Q, KC, VC, TABLE, POS, BLK_ROW, BLK_TOK, BLK_N, PM, PL, PACC, COS, SIN, qk_scale, inv_kv_scale,
                 stride_qt, stride_qh, stride_ks, stride_kh, stride_table, stride_cos, H: tl.constexpr,
                 KVH: tl.constexpr, GROUP: tl.constexpr, TOK: tl.constexpr, TOKP: tl.constexpr, M: tl.constexpr,
                 D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                 LOOP_WHILE: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr):
    """Program (block b, KV head, split): the partial (max, sum, output) of one chunk of b's context
    for the block's tokens x the GROUP query heads of the KV head (rows as in the one-pass kernel);
    partials are laid out [B, TOK, H, SPLITS] (and DP wide).

    ROPE: Q is the step's fused QKV output (``rope_store``'s input), and this program rotates its
    query rows itself and writes the keys and values of the new tokens in its chunk (``Rope``: no
    other program reads them)."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(BLK_ROW + b).to(tl.int64)
    t0 = tl.load(BLK_TOK + b).to(tl.int64)
    nt = tl.load(BLK_N + b)
    r = tl.arange(0, M)
    tok = r // GROUP
    head = kvh * GROUP + r % GROUP
    valid = (tok < nt) & (r < TOK * GROUP)
    d = tl.arange(0, DP)
    dm = d < D
    pos = tl.load(POS + t0 + tok, mask=valid, other=0)  # each row sees keys up to its own token's position
    kv_len = tl.load(POS + t0 + nt - 1) + 1  # a block's tokens are consecutive: the last sees the most
    chunk = _chunk(kv_len, SPLITS, BLOCK_N)
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)  # start >= end: a split past the context, left neutral
    q = load_queries(Q, KC, VC, TABLE, POS, COS, SIN, row, t0, nt, tok, head, valid, pos, kvh, start, end, d, dm,
                     inv_kv_scale, stride_qt, stride_qh, stride_cos, stride_ks, stride_kh, stride_table, H, KVH, D,
                     TOKP, PAGE, ROPE, FP8)
    # A row whose position lies before this chunk sees no key of it: its max stays -1e30 and the merge
    # gives the split no weight (split 0 holds key 0, which every row sees).
    m_i = tl.full([M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, DP], dtype=tl.float32)
    if LOOP_WHILE:  # the CPU interpreter cannot take a loaded scalar as a range() bound
        tile = start
        while tile < end:
            m_i, l_i, acc = attend_tile(q, KC, VC, TABLE, row, kvh, tile, end, pos, d, dm, qk_scale, m_i, l_i, acc,
                                        stride_ks, stride_kh, stride_table, PAGE, BLOCK_N)
            tile += BLOCK_N
    else:
        for tile in range(start, end, BLOCK_N):
            m_i, l_i, acc = attend_tile(q, KC, VC, TABLE, row, kvh, tile, end, pos, d, dm, qk_scale, m_i, l_i, acc,
                                        stride_ks, stride_kh, stride_table, PAGE, BLOCK_N)
    part = ((b * TOK + tok) * H + head) * SPLITS + split
    tl.store(PM + part, m_i, mask=valid)
    tl.store(PL + part, l_i, mask=valid)
    tl.store(PACC + part[:, None] * DP + d[None, :], acc, mask=valid[:, None])


@triton.jit
def merge_kernel(PM, PL, PACC, OUT, BLK_TOK, BLK_N, kv_scale, stride_ot, stride_oh, H: tl.constexpr,
                 TOK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SPLITS: tl.constexpr):
    """Program (block b, query head): for each of the block's tokens, the softmax-weighted merge of
    the head's SPLITS partials (a block's tokens past its count are left alone, as the one-pass kernel does)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    t0 = tl.load(BLK_TOK + b).to(tl.int64)
    nt = tl.load(BLK_N + b)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, DP)
    for i in tl.static_range(TOK):
        if i < nt:
            part = ((b * TOK + i) * H + h) * SPLITS + s
            m = tl.load(PM + part)
            l_s = tl.load(PL + part)
            acc = tl.load(PACC + part[:, None] * DP + d[None, :])
            w = tl.exp2(m - tl.max(m, 0))  # base 2, as the partials' max; a neutral split's weight is exp2(-1e30) = 0
            total = tl.sum(w * l_s, 0)
            out = tl.sum(acc * w[:, None], 0) * (kv_scale / total)  # keys and values are stored / kv_scale
            tl.store(OUT + (t0 + i) * stride_ot + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < D)


def split_decode_attention(q: torch.Tensor | Rope, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                           positions: torch.Tensor, blk_row: torch.Tensor, blk_tok: torch.Tensor, blk_n: torch.Tensor,
                           tokens_per_block: int, splits: int, block_size: int, scale: float, kv_scale: float = 1.0,
                           policy: SplitPolicy | None = None) -> torch.Tensor:
    """Attention output ``[T, heads, head_dim]`` of a step described by its query blocks (as the one-pass
    ``paged_attention``: up to ``tokens_per_block`` consecutive tokens of one sequence each; one for a
    decode step, k + 1 for a speculative verify), each block's context cut into ``splits`` (a power of
    two) chunks. ``q``: the rotated queries ``[T, heads, head_dim]``, or a :class:`Rope` (a decode or
    verify step), whose new keys and values the kernel also writes to the cache."""
    if splits < 1 or splits & (splits - 1):
        raise ConfigError(f"split_decode_attention got splits={splits}", "give a power of two (1, 2, 4, ...)")
    policy = policy or SplitPolicy()
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    heads, source, cos, sin, stride_qt, stride_qh = query_source(q)
    tokens, device = source.shape[0], source.device
    group = heads // kv_heads
    blocks = blk_row.shape[0]
    m = max(16, triton.next_power_of_2(tokens_per_block * group))
    dp = max(16, triton.next_power_of_2(head_dim))
    # Scratch partials: fresh per call, so inside a captured graph they come from the graph's pool.
    pm = torch.empty((blocks, tokens_per_block, heads, splits), dtype=torch.float32, device=device)
    pl = torch.empty_like(pm)
    pacc = torch.empty((blocks, tokens_per_block, heads, splits, dp), dtype=torch.float32, device=device)
    out = torch.empty((tokens, heads, head_dim), dtype=source.dtype, device=device)
    qk_scale = scale * kv_scale * 1.4426950408889634  # base 2, as the one-pass kernel; keys are k / kv_scale
    split_kernel[(blocks, kv_heads, splits)](
        source, k_cache, v_cache, table, positions, blk_row, blk_tok, blk_n, pm, pl, pacc, cos, sin, qk_scale,
        1.0 / kv_scale, stride_qt, stride_qh, k_cache.stride(0), k_cache.stride(1), table.stride(0), cos.stride(0),
        H=heads, KVH=kv_heads, GROUP=group, TOK=tokens_per_block, TOKP=triton.next_power_of_2(tokens_per_block), M=m,
        D=head_dim, DP=dp, PAGE=block_size, BLOCK_N=policy.block_n, SPLITS=splits, LOOP_WHILE=INTERPRETED,
        ROPE=isinstance(q, Rope), FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=policy.num_warps if m <= 64 else 2 * policy.num_warps,
    )
    merge_kernel[(blocks, heads)](pm, pl, pacc, out, blk_tok, blk_n, kv_scale, out.stride(0), out.stride(1), H=heads,
                                  TOK=tokens_per_block, D=head_dim, DP=dp, SPLITS=splits,
                                  num_warps=1 if splits * dp <= 1024 else 2)
    return out
