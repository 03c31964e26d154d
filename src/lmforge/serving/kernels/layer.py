"""Triton kernels of the paged engine's forward pass on CUDA (imported only where Triton is present).

Four kernels replace the ~35 small PyTorch ops of a Llama layer's non-matmul work, so a captured
decode step is ~8-9 kernels per layer instead of dozens (on an H100 every kernel in a CUDA graph
costs ~2 us however small it is):

- ``add_rms_norm``: the residual add and the RMSNorm that follows it, one pass over the row;
- ``rope_store``: rotary embedding of the query and key heads, and the write of the token's key and
  value into its paged-cache slot;
- ``silu_mul``: SwiGLU's ``silu(gate) * up``;
- ``paged_attention``: causal attention of query tokens over their sequence's paged cache, for
  decode (one token per sequence) and chunked prefill (many) alike. A program takes up to ``TOK``
  consecutive tokens of one sequence times the ``GROUP`` query heads that share one KV head, so the
  keys and values of each cache tile are read once for the whole group (grouped-query attention).
  A pure decode step with few sequences takes the split-K path of ``decode_attention.py`` instead
  (``model/ops.py``: ``TritonOps._attend`` chooses).

In decode and verify steps, where no query block reads keys that another writes, the attention
kernels also do ``rope_store``'s work (:class:`Rope`, ``rotate``, ``store_new_kv``): a program
rotates its query rows from the QKV output and writes its new tokens' keys and values before it
reads the cache, which saves a kernel per layer.

Rounding follows the PyTorch ops they replace where it is cheap (the residual sum and the norm are
rounded to the model dtype exactly where Llama rounds them); the rotary product is computed in
fp32 and rounded once. ``model/ops.py`` holds the PyTorch versions (CPU, and the reference in tests:
``TRITON_INTERPRET=1`` runs these kernels on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_rms_norm_kernel(X, R, W, OUT, ROUT, stride_x, stride_r, stride_o, stride_ro, N, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ROUT.dtype.element_ty)
        tl.store(ROUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * y).to(OUT.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); without a residual, (rms_norm(x), x)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else x
    r = residual if residual is not None else x
    _add_rms_norm_kernel[(rows,)](x, r, weight, out, new_res, x.stride(0), r.stride(0), out.stride(0),
                                  new_res.stride(0), n, eps, HAS_RES=residual is not None,
                                  BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 2048 else 4)
    return out, new_res


@triton.jit
def _rope_store_kernel(QKV, COS, SIN, POS, SLOTS, QOUT, KC, VC, stride_qkv, stride_cos, stride_qt, stride_qh,
                       stride_ks, stride_kh, inv_kv_scale, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                       HALF: tl.constexpr, HALF_P: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(POS + t)
    i = tl.arange(0, HALF_P)
    m = i < HALF
    c = tl.load(COS + pos * stride_cos + i, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * stride_cos + i, mask=m, other=0.0).to(tl.float32)
    src = QKV + t * stride_qkv + h * D
    x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if h < H:
        dst = QOUT + t * stride_qt + h * stride_qh
        tl.store(dst + i, o1.to(QOUT.dtype.element_ty), mask=m)
        tl.store(dst + HALF + i, o2.to(QOUT.dtype.element_ty), mask=m)
    else:
        kh = h - H
        slot = tl.load(SLOTS + t).to(tl.int64)
        kdst = KC + slot * stride_ks + kh * stride_kh
        tl.store(kdst + i, to_cache(o1, inv_kv_scale, KC, FP8), mask=m)
        tl.store(kdst + HALF + i, to_cache(o2, inv_kv_scale, KC, FP8), mask=m)
        vsrc = QKV + t * stride_qkv + (H + KVH + kh) * D
        vdst = VC + slot * stride_ks + kh * stride_kh
        v1 = tl.load(vsrc + i, mask=m, other=0.0).to(tl.float32)
        v2 = tl.load(vsrc + HALF + i, mask=m, other=0.0).to(tl.float32)
        tl.store(vdst + i, to_cache(v1, inv_kv_scale, VC, FP8), mask=m)
        tl.store(vdst + HALF + i, to_cache(v2, inv_kv_scale, VC, FP8), mask=m)


@triton.jit
def to_cache(x, inv_kv_scale, C, FP8: tl.constexpr):
    """fp32 -> the cache dtype; an fp8 cache holds x / kv_scale, saturated to e4m3's finite range."""
    if FP8:
        x = tl.clamp(x * inv_kv_scale, -448.0, 448.0)
    return x.to(C.dtype.element_ty)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
               head_dim: int, kv_scale: float = 1.0) -> torch.Tensor:
    """Rotary-embedded queries ``[T, heads, head_dim]``; keys and values go into their cache slots."""
    tokens = qkv.shape[0]
    q = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    _rope_store_kernel[(tokens, heads + kv_heads)](
        qkv, cos, sin, positions, slots, q, k_cache, v_cache, qkv.stride(0), cos.stride(0), q.stride(0),
        q.stride(1), k_cache.stride(0), k_cache.stride(1), 1.0 / kv_scale, H=heads, KVH=kv_heads, D=head_dim,
        HALF=half, HALF_P=triton.next_power_of_2(half), FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=1,
    )
    return q


@triton.jit
def rotate(src, cs, sn, d, mask, HALF: tl.constexpr):
    """Rows at ``src`` (pointers [R, 1]) rotated by the rope table rows ``cs``/``sn``, in float32 with
    ``rope_store``'s arithmetic (the table's two halves repeat, so column d holds d's angle)."""
    first = (d < HALF)[None, :]
    partner = tl.where(d < HALF, d + HALF, d - HALF)[None, :]
    x = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sn + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return x * c + tl.where(first, -xp, xp) * s


@triton.jit
def store_new_kv(QKV, KC, VC, TABLE, POS, COS, SIN, row, t0, nt, kvh, start, end, d, dm, inv_kv_scale, stride_qt,
                 stride_cos, stride_ks, stride_kh, stride_table, H: tl.constexpr, KVH: tl.constexpr,
                 D: tl.constexpr, TOKP: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr):
    """Rotate the keys of the block's new tokens whose positions fall in [start, end) and write them and
    their values to the cache. Only this program reads those positions (the caller's rule), so no other
    program waits for them; its own threads do, behind a barrier after this."""
    tk = tl.arange(0, TOKP)
    tpos = tl.load(POS + t0 + tk, mask=tk < nt, other=-1)
    mine = (tk < nt) & (tpos >= start) & (tpos < end)
    page = tl.load(TABLE + row * stride_table + tpos // PAGE, mask=mine, other=0).to(tl.int64)
    slot = page * PAGE + tpos % PAGE
    mask = mine[:, None] & dm[None, :]
    src = QKV + (t0 + tk)[:, None] * stride_qt
    key = rotate(src + (H + kvh) * D, COS + tpos[:, None] * stride_cos, SIN + tpos[:, None] * stride_cos, d, mask,
                 D // 2)
    value = tl.load(src + (H + KVH + kvh) * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    dst = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
    tl.store(KC + dst, to_cache(key, inv_kv_scale, KC, FP8), mask=mask)
    tl.store(VC + dst, to_cache(value, inv_kv_scale, VC, FP8), mask=mask)


@triton.jit
def load_queries(Q, KC, VC, TABLE, POS, COS, SIN, row, t0, nt, tok, head, valid, pos, kvh, start, end, d, dm,
                 inv_kv_scale, stride_qt, stride_qh, stride_cos, stride_ks, stride_kh, stride_table, H: tl.constexpr,
                 KVH: tl.constexpr, D: tl.constexpr, TOKP: tl.constexpr, PAGE: tl.constexpr, ROPE: tl.constexpr,
                 FP8: tl.constexpr):
    """An attention program's query rows [M, DP]. ROPE: Q is the fused QKV output (``Rope``); the rows are
    rotated here, and the block's new keys and values with positions in [start, end), which only this
    program reads, go to the cache before it reads the cache back (a barrier)."""
    q_rows = Q + (t0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh
    q_mask = valid[:, None] & dm[None, :]
    if ROPE:
        q = rotate(q_rows, COS + pos[:, None] * stride_cos, SIN + pos[:, None] * stride_cos, d, q_mask,
                   D // 2).to(Q.dtype.element_ty)  # rounded as rope_store rounds the query it writes
        store_new_kv(Q, KC, VC, TABLE, POS, COS, SIN, row, t0, nt, kvh, start, end, d, dm, inv_kv_scale, stride_qt,
                     stride_cos, stride_ks, stride_kh, stride_table, H, KVH, D, TOKP, PAGE, FP8)
        tl.debug_barrier()  # the program's threads read back the keys and values its other threads wrote
    else:
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
    return q


@dataclass(frozen=True)
class Rope:
    """The query input of an attention kernel that does ``rope_store``'s work itself: the fused QKV output
    ``[T, (H + 2 KVH) * D]`` and the model's rope tables (``[positions, D]``, halves repeated). Only for steps
    where every query block reads just the new keys it writes (``StepLayout.decode_step``)."""

    qkv: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    heads: int


def query_source(q: torch.Tensor | Rope) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(query heads, the tensor the kernel reads queries from, cos, sin, its token and head strides): rotated
    queries ``[T, H, D]``, or a :class:`Rope`'s QKV rows (the tables are then read; else not)."""
    if isinstance(q, Rope):
        return q.heads, q.qkv, q.cos, q.sin, q.qkv.stride(0), q.cos.shape[1]  # head h: columns h * head_dim on
    return q.shape[1], q, q, q, q.stride(0), q.stride(1)


@triton.jit
def _silu_mul_kernel(GU, OUT, stride_gu, stride_o, I, BLOCK: tl.constexpr):  # noqa: E741 - I: the MLP width, as in the kernel's math
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(GU + t * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_gu + I + cols, mask=m, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)  # torch rounds silu's output
    tl.store(OUT + t * stride_o + cols, (act * u).to(OUT.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    tokens, width = gate_up.shape
    inner = width // 2
    out = torch.empty((tokens, inner), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(inner, block))](gate_up, out, gate_up.stride(0), out.stride(0), inner,
                                                          BLOCK=block, num_warps=4)
    return out


@triton.jit
def attend_tile(q, KC, VC, TABLE, row, kvh, start, kv_len, pos, d, dm, qk_scale, m_i, l_i, acc,
                 stride_ks, stride_kh, stride_table, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of BLOCK_N cache positions below ``kv_len``: online-softmax update of (max, sum, accumulator).
    Shared with the split-K decode kernel (``decode_attention.py``), which passes its chunk's end as ``kv_len``."""
    n = start + tl.arange(0, BLOCK_N)
    nm = n < kv_len
    page = tl.load(TABLE + row * stride_table + n // PAGE, mask=nm, other=0).to(tl.int64)
    slot = page * PAGE + n % PAGE
    kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
    kv_mask = nm[:, None] & dm[None, :]
    k = tl.load(KC + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # an fp8 cache widens here
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(n[None, :] <= pos[:, None], s, -1.0e30)  # causal: each query sees keys up to its position
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(VC + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(Q, KC, VC, OUT, TABLE, POS, BLK_ROW, BLK_TOK, BLK_N, COS, SIN, scale, kv_scale, inv_kv_scale,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_table,
                            stride_cos, H: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr, TOK: tl.constexpr,
                            TOKP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                            PAGE: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_WHILE: tl.constexpr, ROPE: tl.constexpr,
                            FP8: tl.constexpr):
    """Program (query block, KV head) over the block's whole context. ROPE: Q is the fused QKV output, and
    the program rotates its query rows and writes its new tokens' keys and values (``Rope``)."""
    bid = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(BLK_ROW + bid).to(tl.int64)
    t0 = tl.load(BLK_TOK + bid).to(tl.int64)
    nt = tl.load(BLK_N + bid)
    r = tl.arange(0, M)
    tok = r // GROUP
    head = kvh * GROUP + r % GROUP
    valid = (tok < nt) & (r < TOK * GROUP)
    pos = tl.load(POS + t0 + tok, mask=valid, other=0)
    d = tl.arange(0, DP)
    dm = d < D
    kv_len = tl.load(POS + t0 + nt - 1) + 1  # a block's tokens are consecutive: the last sees the most
    q = load_queries(Q, KC, VC, TABLE, POS, COS, SIN, row, t0, nt, tok, head, valid, pos, kvh, 0, kv_len, d, dm,
                     inv_kv_scale, stride_qt, stride_qh, stride_cos, stride_ks, stride_kh, stride_table, H, KVH, D,
                     TOKP, PAGE, ROPE, FP8)
    qk_scale = scale * kv_scale * 1.4426950408889634  # base 2: exp2 is the cheap instruction; keys are k/kv_scale
    m_i = tl.full([M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, DP], dtype=tl.float32)
    if LOOP_WHILE:  # the CPU interpreter cannot take a loaded scalar as a range() bound
        start = 0
        while start < kv_len:
            m_i, l_i, acc = attend_tile(q, KC, VC, TABLE, row, kvh, start, kv_len, pos, d, dm, qk_scale, m_i, l_i,
                                         acc, stride_ks, stride_kh, stride_table, PAGE, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, kv_len, BLOCK_N):
            m_i, l_i, acc = attend_tile(q, KC, VC, TABLE, row, kvh, start, kv_len, pos, d, dm, qk_scale, m_i, l_i,
                                         acc, stride_ks, stride_kh, stride_table, PAGE, BLOCK_N)
    out = acc * kv_scale / l_i[:, None]
    tl.store(OUT + (t0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=valid[:, None] & dm[None, :])


def paged_attention(q: torch.Tensor | Rope, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                    positions: torch.Tensor, blk_row: torch.Tensor, blk_tok: torch.Tensor, blk_n: torch.Tensor,
                    tokens_per_block: int, block_size: int, scale: float, kv_scale: float = 1.0) -> torch.Tensor:
    """Attention output ``[T, heads, head_dim]`` for queries ``q`` described by the query blocks (or a
    :class:`Rope`, whose new keys and values the kernel also writes to the cache)."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    heads, source, cos, sin, stride_qt, stride_qh = query_source(q)
    group = heads // kv_heads
    m = max(16, triton.next_power_of_2(tokens_per_block * group))
    out = torch.empty((source.shape[0], heads, head_dim), dtype=source.dtype, device=source.device)
    _paged_attention_kernel[(blk_row.shape[0], kv_heads)](
        source, k_cache, v_cache, out, table, positions, blk_row, blk_tok, blk_n, cos, sin, scale, kv_scale,
        1.0 / kv_scale, stride_qt, stride_qh, out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        table.stride(0), cos.stride(0), H=heads, KVH=kv_heads, GROUP=group, TOK=tokens_per_block,
        TOKP=triton.next_power_of_2(tokens_per_block), M=m, D=head_dim, DP=max(16, triton.next_power_of_2(head_dim)),
        PAGE=block_size, BLOCK_N=64, LOOP_WHILE=INTERPRETED, ROPE=isinstance(q, Rope),
        FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4 if m <= 64 else 8,
    )
    return out
