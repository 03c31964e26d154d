"""Triton kernels of the quantized linear layers on CUDA (imported only where Triton is present).

- ``weight_only_mm``: ``y = (x @ q.T) * scale`` for one-byte weights ``q [N, K]`` (int8, or float8
  e4m3 on Hopper) with one scale per output channel, reading the weights straight from memory (half
  the bytes of bf16; a decode step is bound by reading weights) and widening them to the activation
  dtype in registers. No allocation but the output, so it runs inside the captured decode graphs.
- ``quant_rows_fp8``: per-row dynamic quantization of activations to float8 e4m3 for
  ``torch._scaled_mm`` (one kernel instead of five PyTorch ops per linear layer; in a CUDA graph each
  kernel costs ~2 us however small), writing zero rows up to the padded row count that
  ``_scaled_mm`` wants.

Block shapes are chosen by :func:`weight_only_config` from the number of rows: small ``M`` (decode) is a
matrix-vector product bound by weight bytes, so blocks are narrow in N to spread the weights over
all multiprocessors; large ``M`` (prefill) is compute-bound and uses wide tensor-core tiles.
``python bench/serve_quant.py --sweep`` checks these kernels and times the alternatives on the
device (an H100 picked these; see bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weight_only_mm_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                           W_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    nm = rn < N
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # a [BLOCK_K, BLOCK_N] tile of q.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        km = (k + rk) < K
        x = tl.load(x_ptrs, mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=nm[None, :] & km[:, None], other=0)  # raw bytes: masked lanes are 0
        if W_FP8:
            w = w.to(tl.float8e4nv, bitcast=True)
        acc += tl.dot(x, w.to(x.dtype))
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(S + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def weight_only_config(m: int, n: int, k: int) -> dict[str, int]:
    """Block shapes and warps for ``[m, k] x [k, n]`` (see the module docstring)."""
    if m <= 16:  # narrow N blocks for long K: more programs, all SMs streaming weights
        return dict(BLOCK_M=16, BLOCK_N=16 if k >= 4096 else 32, BLOCK_K=256, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32 if n > 2048 else 16, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def weight_only_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   config: dict[str, int] | None = None) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16) times int8 or fp8 ``qweight [N, K]`` scaled per output channel: ``[M, N]``."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = config or weight_only_config(m, n, k)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    fp8 = qweight.dtype == torch.float8_e4m3fn
    raw = qweight.view(torch.int8) if fp8 else qweight
    _weight_only_mm_kernel[grid](x, raw, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0),
                                 raw.stride(0), y.stride(0), HAS_BIAS=bias is not None, W_FP8=fp8, **cfg)
    return y


@triton.jit
def _quant_rows_fp8_kernel(X, Q, S, M, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < K
    live = row < M  # rows past M are the padding _scaled_mm wants: zeros, scale 1
    x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=cm & live, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax, 1e-12) / 448.0
    scale = tl.where(live, scale, 1.0)
    q = tl.clamp(x / scale, -448.0, 448.0)
    tl.store(Q + row.to(tl.int64) * stride_q + cols, q.to(Q.dtype.element_ty), mask=cm)
    tl.store(S + row, scale)


def quant_rows_fp8(x: torch.Tensor, padded_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``q [padded_rows, K]`` float8 e4m3, ``scale [padded_rows, 1]`` float32) with ``x ≈ q * scale``."""
    m, k = x.shape
    q = torch.empty((padded_rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((padded_rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quant_rows_fp8_kernel[(padded_rows,)](x, q, s, m, k, x.stride(0), q.stride(0), BLOCK=block,
                                           num_warps=8 if block >= 2048 else 4)
    return q, s


@triton.jit
def _int4_widen_kernel(P, SZ, LAYOUT, W, N, K, KT, GROUP: tl.constexpr, TN: tl.constexpr, TK: tl.constexpr):
    nt = tl.program_id(0)
    kt = tl.program_id(1)
    e = tl.arange(0, TN * TK)  # element r * TK + c of this tile
    pos = tl.load(LAYOUT + e)  # its nibble in the tile (int4_layout.py learned the map)
    word = tl.load(P + (nt.to(tl.int64) * KT + kt) * (TN * TK // 8) + pos // 8)
    q = (word >> ((pos % 8) * 4)) & 15
    n = nt * TN + e // TK
    k = kt * TK + e % TK
    sz = SZ + ((k // GROUP).to(tl.int64) * N + n) * 2  # tinygemm's [K / group, N, 2] scales and zeros
    w = (q.to(tl.float32) - 8.0) * tl.load(sz).to(tl.float32) + tl.load(sz + 1).to(tl.float32)
    tl.store(W + n.to(tl.int64) * K + k, w.to(W.dtype.element_ty))


def int4_widen(packed: torch.Tensor, scales_and_zeros: torch.Tensor, layout: torch.Tensor, n: int, k: int,
               group: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weights ``[N, K]`` held by tinygemm's ``packed`` int4 tiles, as ``(q - 8) * scale + zero``."""
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    _int4_widen_kernel[(n // 8, k // 128)](packed, scales_and_zeros, layout, w, n, k, k // 128, GROUP=group,
                                           TN=8, TK=128, num_warps=4)
    return w
