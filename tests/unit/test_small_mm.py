"""``small_mm`` (``kernels/quant.py``), the decode steps' Triton matmul for dense half-precision weights,
against ``F.linear`` in float32: in Triton's CPU interpreter (``TRITON_INTERPRET=1``, run by
``test_decode_attention.py::test_interpreter_tests_run``), and compiled for sm_90 without a GPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lmforge.serving.kernels.quant import SMALL_ROWS, small_config, small_mm
from lmforge.serving.model.ops import TritonOps

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="launches Triton kernels: needs TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("rows,n,k,bias", [(1, 40, 96, False), (5, 33, 300, True), (16, 48, 512, False)])
def test_small_mm_matches_linear(rows: int, n: int, k: int, bias: bool) -> None:
    """Rows, output channels and K that are not multiples of the blocks (masked edges), with and without bias.
    float16: the interpreter's bfloat16 arithmetic is broken (numpy has no bfloat16; its results are garbage),
    and the kernel's code is the same for both half types."""
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).half()
    w = torch.randn(n, k, generator=gen).half()
    b = torch.randn(n, generator=gen).half() if bias else None
    ref = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    # Small blocks: several programs along N and several K steps even for these small shapes.
    got = small_mm(x, w, b, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1))
    assert got.dtype == torch.float16 and got.shape == (rows, n)
    assert float((got.float() - ref).norm() / ref.norm()) < 2e-3  # fp16 output rounding
    strided = torch.randn(rows, 2 * k, generator=gen).half()[:, ::2]  # a non-contiguous input is copied first
    ref = F.linear(strided.float(), w.float())
    assert float((small_mm(strided, w, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, num_warps=4,
                                                   num_stages=1)).float() - ref).norm() / ref.norm()) < 2e-3


@needs_interpreter
def test_small_mm_default_config_of_a_batch() -> None:
    """The default blocks of 17-64 rows (64-row blocks), 40 rows: one row block, masked."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 200, generator=gen).half(), torch.randn(48, 200, generator=gen).half()
    ref = F.linear(x.float(), w.float())
    assert float((small_mm(x, w).float() - ref).norm() / ref.norm()) < 2e-3


def test_linear_takes_small_mm_only_for_few_half_precision_rows() -> None:
    """Which path ``TritonOps.linear`` takes (by the host shape only, so a captured graph keeps one); float32
    and many rows stay on F.linear, which the CPU runs (no kernel is launched for these)."""
    ops = TritonOps()
    w = torch.randn(8, 32)
    x = torch.randn(SMALL_ROWS + 1, 32)
    assert torch.equal(ops.linear(x, w, None), F.linear(x, w))  # float32: F.linear
    ops.small_matmul = False
    xb, wb = x[:2].bfloat16(), w.bfloat16()
    assert torch.equal(ops.linear(xb, wb, None), F.linear(xb, wb))  # switched off: F.linear
    assert small_config(1, 2048, 5632)["BLOCK_K"] == 512 and small_config(64, 2560, 2048)["BLOCK_M"] == 64


@pytest.mark.slow  # an ahead-of-time compile through ptxas
@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces the compiler")
def test_small_mm_compiles_for_an_h100() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmforge.serving.kernels.quant import _weight_only_mm_kernel as kernel

    cfg = small_config(1, 2560, 2048)
    consts = {"HAS_BIAS": False, "W_FP8": False, "SCALED": False, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
              "BLOCK_K": cfg["BLOCK_K"]}
    types = {"X": "*bf16", "W": "*bf16", "S": "*bf16", "B": "*bf16", "Y": "*bf16"}
    names = kernel.arg_names
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]
