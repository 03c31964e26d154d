"""The split-K decode attention (``kernels/decode_attention.py``) against the PyTorch attention.

The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, read when Triton compiles a
kernel, so it must be set before the process imports one): the tests that launch them are skipped
otherwise, and ``test_interpreter_tests_run`` runs them (and the paged engine's interpreter test)
in a subprocess with it set (a slow test: CI's ``make test-slow`` runs it). Compiled mode, which the
interpreter does not check, is covered by compiling the kernels for sm_90 without a GPU. Contexts cross cache pages (4
positions), tiles (16) and split boundaries; grouped-query heads; bf16-sized and fp8 caches.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

pytest.importorskip("triton")  # the imports below load Triton (not a CPU dependency)

from lmforge.core.errors import ConfigError
from lmforge.serving.kernels.decode_attention import SplitPolicy, split_decode_attention
from lmforge.serving.kernels.layer import Rope, paged_attention
from lmforge.serving.model.ops import Ops, StepLayout, TritonOps

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="launches Triton kernels: needs TRITON_INTERPRET=1")
PAGE, MAX_BLOCKS = 4, 20  # cache rows hold up to 80 positions
POLICY = SplitPolicy(block_n=16)


def _step(contexts: list[int], heads: int, kv_heads: int, cache_dtype: torch.dtype, seed: int, tokens: int = 1,
          tokens_per_block: int = 1, decode: bool = False):
    """A step of ``tokens`` new tokens per sequence (1: decode; k + 1: a verify; more: a prefill chunk) ending
    at position ``context - 1``, cut into query blocks of ``tokens_per_block``, over random caches whose
    rows use shuffled pages (row ``i`` of ``len(contexts) + 1``; the extra row is never read)."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(contexts) + 1
    head_dim = 16
    table = torch.randperm(rows * MAX_BLOCKS + 1, generator=gen)[: rows * MAX_BLOCKS].reshape(rows, MAX_BLOCKS)
    slots = (rows * MAX_BLOCKS + 1) * PAGE
    k_cache, v_cache = (torch.randn(slots, kv_heads, head_dim, generator=gen).to(cache_dtype) for _ in range(2))
    runs = [min(tokens, n) for n in contexts]
    q = torch.randn(sum(runs), heads, head_dim, generator=gen)
    items = [(i, n - run, [7] * run) for i, (n, run) in enumerate(zip(contexts, runs))]
    layout = StepLayout.build(items, torch.device("cpu"), tokens_per_block, None, decode)
    return q, k_cache, v_cache, table.int(), layout


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [  # (contexts, heads, kv_heads): one page, page and tile edges, 2 and 4 query heads per KV head, plain MHA
    ([37], 4, 2),
    ([1, 16, 47], 8, 2),
    ([1, 2, 15, 16, 17, 31, 33, 80], 4, 2),
    ([5, 64, 79], 2, 2),
]


@needs_interpreter
@pytest.mark.parametrize("cache_dtype,kv_scale", [(torch.float32, 1.0), (torch.float8_e4m3fn, 0.5)],
                         ids=["fp32-cache", "fp8-cache"])
@pytest.mark.parametrize("contexts,heads,kv_heads", CASES, ids=[f"b{len(c[0])}-h{c[1]}-kv{c[2]}" for c in CASES])
def test_split_decode_matches_torch_attention(contexts, heads, kv_heads, cache_dtype, kv_scale) -> None:
    q, k_cache, v_cache, table, layout = _step(contexts, heads, kv_heads, cache_dtype, seed=len(contexts))
    ref_ops = Ops()
    ref_ops.kv_scale = kv_scale
    ref = ref_ops.attention(q, k_cache, v_cache, table, layout, PAGE, 0.25)
    one_pass = paged_attention(q, k_cache, v_cache, table, layout.positions, layout.blk_row, layout.blk_tok,
                               layout.blk_n, 1, PAGE, 0.25, kv_scale)
    assert _rel(one_pass, ref) < 1e-5
    # 1: the merge of one partial; 8 x 16-position tiles > 80: most sequences leave splits empty; the ops'
    # heuristic below picks 4 (80 positions are 5 tiles).
    for splits in (1, 2, 8) if len(contexts) == 1 else (2, 8):
        out = split_decode_attention(q, k_cache, v_cache, table, layout.positions, layout.blk_row, layout.blk_tok,
                                     layout.blk_n, 1, splits, PAGE, 0.25, kv_scale, POLICY)
        assert _rel(out, ref) < 1e-5, f"{splits} splits"
    ops = TritonOps(POLICY)
    ops.kv_scale = kv_scale
    assert POLICY.splits(len(contexts), kv_heads, MAX_BLOCKS * PAGE, 132) == 4  # the ops take the split path
    assert _rel(ops.attention(q, k_cache, v_cache, table, layout, PAGE, 0.25), ref) < 1e-5


MULTI = [  # (contexts, tokens per sequence, tokens per block): verify steps (k + 1 = 5, a context shorter than
    # the run), and prefill chunks cut into blocks of 8 (the last block of a sequence partly filled)
    ([37, 80, 3], 5, 5),
    ([9, 64], 5, 5),
    ([47, 21], 19, 8),
]


@needs_interpreter
@pytest.mark.parametrize("contexts,tokens,per_block", MULTI, ids=[f"t{c[1]}-tpb{c[2]}" for c in MULTI])
def test_split_attention_of_query_blocks_of_several_tokens(contexts, tokens, per_block) -> None:
    """Verify steps and short prefill chunks split their contexts too: each row (token x query head)
    masks the keys past its own position, also in chunks it sees none of."""
    q, k_cache, v_cache, table, layout = _step(contexts, 8, 2, torch.float32, seed=tokens, tokens=tokens,
                                               tokens_per_block=per_block)
    ref = Ops().attention(q, k_cache, v_cache, table, layout, PAGE, 0.25)
    one_pass = paged_attention(q, k_cache, v_cache, table, layout.positions, layout.blk_row, layout.blk_tok,
                               layout.blk_n, per_block, PAGE, 0.25)
    assert _rel(one_pass, ref) < 1e-5
    for splits in (2, 8):
        out = split_decode_attention(q, k_cache, v_cache, table, layout.positions, layout.blk_row, layout.blk_tok,
                                     layout.blk_n, per_block, splits, PAGE, 0.25, 1.0, POLICY)
        assert _rel(out, ref) < 1e-5, f"{splits} splits"
    assert _rel(TritonOps(POLICY).attention(q, k_cache, v_cache, table, layout, PAGE, 0.25), ref) < 1e-5


ROPE_CASES = [  # (contexts, tokens per sequence, heads, kv_heads, cache dtype): decode steps and verify steps
    ([37], 1, 4, 2, torch.float32),
    ([1, 2, 15, 16, 17, 31, 33, 80], 1, 8, 2, torch.float32),
    ([5, 64, 79], 1, 2, 2, torch.float8_e4m3fn),
    ([37, 80, 3], 5, 8, 2, torch.float32),
    ([50], 5, 4, 2, torch.float32),  # at 8 splits, chunks of 16: the new positions 45-49 straddle two chunks
]


@needs_interpreter
@pytest.mark.parametrize("contexts,tokens,heads,kv_heads,cache_dtype", ROPE_CASES,
                         ids=[f"b{len(c[0])}-t{c[1]}-h{c[2]}-{str(c[4])[6:]}" for c in ROPE_CASES])
def test_rotating_kernels_equal_rope_store_then_attention(contexts, tokens, heads, kv_heads, cache_dtype) -> None:
    """A decode or verify step's attention kernels that rotate the queries and store the new keys and values
    themselves (``Rope``) give the attention and the cache of ``rope_store`` followed by ``attention``: the
    split kernel and the one-pass kernel."""
    _, k_cache, v_cache, table, layout = _step(contexts, heads, kv_heads, cache_dtype, seed=tokens + heads,
                                               tokens=tokens, tokens_per_block=tokens, decode=True)
    assert layout.decode_step
    gen = torch.Generator().manual_seed(5)
    head_dim, kv_scale = k_cache.shape[2], 0.5 if cache_dtype == torch.float8_e4m3fn else 1.0
    qkv = torch.randn(layout.tokens.shape[0], (heads + 2 * kv_heads) * head_dim, generator=gen)
    cos, sin = (torch.randn(MAX_BLOCKS * PAGE, head_dim // 2, generator=gen).repeat(1, 2) for _ in range(2))
    ref_ops, ops = Ops(), TritonOps(POLICY)
    ref_ops.kv_scale = ops.kv_scale = kv_scale
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = table[layout.rows, layout.positions // PAGE].long() * PAGE + layout.positions % PAGE
    # The rope_store kernel's caches: the interpreter rounds to fp8 its own way (ties away from zero), so an fp8
    # cache is compared kernel to kernel; float32 keys agree with the PyTorch ops too.
    q = ops.rope_store(qkv, cos, sin, layout.positions, slots, k_ref, v_ref, heads, kv_heads, head_dim)
    if cache_dtype == torch.float32:
        k_torch = k_cache.clone()
        q_torch = ref_ops.rope_store(qkv, cos, sin, layout.positions, slots, k_torch, v_cache.clone(), heads,
                                     kv_heads, head_dim)
        assert torch.equal(q_torch, q) and torch.equal(k_torch, k_ref)
    ref = ref_ops.attention(q, k_ref, v_ref, table, layout, PAGE, 0.25)
    for splits in (2, 8):
        k_out, v_out = k_cache.clone(), v_cache.clone()
        out = split_decode_attention(Rope(qkv, cos, sin, heads), k_out, v_out, table,
                                     layout.positions, layout.blk_row, layout.blk_tok, layout.blk_n, tokens, splits,
                                     PAGE, 0.25, kv_scale, POLICY)
        assert _rel(out, ref) < 1e-5, f"{splits} splits"
        assert torch.equal(k_out.float(), k_ref.float()) and torch.equal(v_out.float(), v_ref.float())
    unsplit = TritonOps(SplitPolicy(waves=0.01, block_n=16))  # the one-pass kernel
    for fused in (ops, unsplit):
        fused.kv_scale = kv_scale
        assert fused.rotates_in_attention(layout)
        k_out, v_out = k_cache.clone(), v_cache.clone()
        out = fused.rope_attention(qkv, cos, sin, k_out, v_out, table, layout, PAGE, heads, 0.25)
        assert _rel(out, ref) < 1e-5 and torch.equal(k_out.float(), k_ref.float())
        assert torch.equal(v_out.float(), v_ref.float())


def test_only_decode_and_verify_steps_rotate_in_the_kernel() -> None:
    """Prefill chunks keep rope_store apart, even when each prompt is one block (a prompt may read the blocks
    another prompt of the same forward writes); so do verify steps whose runs need several blocks, the
    PyTorch ops, and the Triton ops with the fusion off (serving.runtime.fused_attention: false)."""
    step = {"contexts": [47, 21], "heads": 8, "kv_heads": 2, "cache_dtype": torch.float32, "seed": 1}
    prefill = _step(**step, tokens=5, tokens_per_block=8)[4]
    verify = _step(**step, tokens=5, tokens_per_block=8, decode=True)[4]
    long_verify = _step(**step, tokens=5, tokens_per_block=4, decode=True)[4]
    assert not prefill.decode_step and verify.decode_step and not long_verify.decode_step
    for policy in (POLICY, SplitPolicy(waves=0.01, block_n=16)):  # split, and the one-pass kernel
        ops = TritonOps(policy)
        assert ops.rotates_in_attention(verify)
        assert not ops.rotates_in_attention(prefill)
        assert not ops.rotates_in_attention(long_verify)
        assert not TritonOps(policy, rope_in_attention=False).rotates_in_attention(verify)
    assert not Ops().rotates_in_attention(verify)


@needs_interpreter
def test_padded_graph_rows_and_the_one_pass_fallback() -> None:
    """Rows padded as graphs.py pads them (position 0 on the scratch row) stay finite, and a batch the
    policy does not split (waves so low it wants one program per KV head) takes the one-pass kernel."""
    q, k_cache, v_cache, table, layout = _step([23, 1, 1], 4, 2, torch.float32, seed=3)
    ref = Ops().attention(q, k_cache, v_cache, table, layout, PAGE, 0.25)
    unsplit = SplitPolicy(waves=0.01, block_n=16)
    assert unsplit.splits(3, 2, MAX_BLOCKS * PAGE, 132) == 1
    for ops in (TritonOps(POLICY), TritonOps(unsplit)):
        out = ops.attention(q, k_cache, v_cache, table, layout, PAGE, 0.25)
        assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5


def test_split_policy_depends_on_host_shapes_only() -> None:
    policy = SplitPolicy()  # waves 2, at most 16 splits, 32-position tiles
    assert policy.splits(1, 4, 4096, 132) == 16  # one sequence: as many as allowed
    assert policy.splits(8, 4, 4096, 132) == 8  # 264 programs wanted over 32 (sequence, KV head) pairs
    assert policy.splits(64, 4, 4096, 132) == 1  # 256 pairs already fill the GPU: the one-pass kernel
    assert policy.splits(1, 4, 64, 132) == 2  # a 64-position cache has two tiles to split between
    assert SplitPolicy(waves=4).splits(64, 4, 4096, 132) == 2
    for bad in ({"block_n": 8}, {"max_splits": 12}, {"waves": 0}):
        with pytest.raises(ConfigError):
            SplitPolicy(**bad)


@pytest.mark.slow  # about a minute and a half on 2 busy cores (the interpreter runs each program in numpy)
@pytest.mark.skipif(INTERPRETED, reason="already running in the interpreter")
def test_interpreter_tests_run() -> None:
    """The interpreter-only tests (this file's, the paged engine's whole-model check, the prefill graphs'
    layout) in a subprocess with ``TRITON_INTERPRET=1``: every one of them must run and pass, none be skipped."""
    tests = [f"{__file__}", "tests/unit/test_serving_paged.py::test_triton_kernels_match_the_model_in_the_interpreter",
             "tests/unit/test_serving_prefill_graphs.py::test_padded_prefill_layout_gives_the_eager_logits_and_cache"]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # 8 split-vs-torch cases, 3 of blocks of several tokens, 5 rotating ones, the fusion rule, the padded rows, the
    # policy, the whole model (its decode step rotates in the kernel), the padded prefill layout (two ops);
    # skipped only: this test and the four compile checks, which need the compiler the interpreter replaces.
    assert lines and lines[-1].startswith("22 passed, 5 skipped"), proc.stdout[-4000:]
    skips = [line for line in lines if line.startswith("SKIPPED")]
    assert len(skips) == 2 and all("interpreter" in line for line in skips), skips  # -rs groups the two compiles


@pytest.mark.slow  # twelve ahead-of-time compiles through ptxas: ~18 s of CPU, more on a busy machine
@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces the compiler")
@pytest.mark.parametrize("cache,splits,tok,fused", [("bf16", 16, 1, True), ("fp8e4nv", 1, 1, False),
                                                   ("bf16", 8, 5, False), ("fp8e4nv", 8, 5, True)])
def test_kernels_compile_for_an_h100(cache: str, splits: int, tok: int, fused: bool) -> None:
    """Compiled mode differs from the interpreter (loaded scalars as loop bounds, int64 offsets, fp8
    loads): the split, merge and one-pass kernels go through Triton's compiler and ptxas for sm_90 (no
    GPU needed), on the Llama-1.1B shape; rotating in the kernel (``fused``) or not."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmforge.serving.kernels import decode_attention as kernels
    from lmforge.serving.kernels import layer

    types = {"Q": "*bf16", "KC": f"*{cache}", "VC": f"*{cache}", "TABLE": "*i32", "POS": "*i64", "BLK_ROW": "*i64",
             "BLK_TOK": "*i32", "BLK_N": "*i32", "PM": "*fp32", "PL": "*fp32", "PACC": "*fp32", "OUT": "*bf16",
             "COS": "*bf16", "SIN": "*bf16", "qk_scale": "fp32", "kv_scale": "fp32",
             "inv_kv_scale": "fp32", "scale": "fp32"}
    split_consts = {"H": 32, "KVH": 4, "GROUP": 8, "TOK": tok, "TOKP": triton.next_power_of_2(tok),
                    "M": max(16, triton.next_power_of_2(8 * tok)), "D": 64, "DP": 64, "PAGE": 16, "BLOCK_N": 32,
                    "SPLITS": splits, "LOOP_WHILE": False, "ROPE": fused, "FP8": cache == "fp8e4nv"}
    merge_consts = {"H": 32, "TOK": tok, "D": 64, "DP": 64, "SPLITS": splits}
    one_pass_consts = {k: v for k, v in split_consts.items() if k != "SPLITS"} | {"BLOCK_N": 64}
    for fn, consts, warps in ((kernels.split_kernel, split_consts, 4), (kernels.merge_kernel, merge_consts, 1),
                              (layer._paged_attention_kernel, one_pass_consts, 4)):
        names = fn.arg_names
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]
