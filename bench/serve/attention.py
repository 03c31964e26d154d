"""Decode attention micro-benchmark: the split-K kernel (``kernels/decode_attention.py``) against the
one-pass paged kernel (``kernels/layer.py``) it replaces for decode and verify steps, on the Llama-1.1B
shape (32 heads, 4 KV heads, head_dim 64, bf16, 16-position pages), one query token per sequence, or
``--tokens k+1`` (a speculative verify step: one query block of k + 1 tokens per sequence).

    PYTHONPATH=src:. python -m bench.serve.attention [--batches 1 8 64] [--contexts 128 256 512 1024 2048 4096]
        [--tokens 1] [--max-len 4096] [--fp8] [--timer events|graph] [--waves 2] [--max-splits 32] [--block-n 32]
        [--out DIR]
    PYTHONPATH=src:. python -m bench.serve.attention --tiny   # CPU check in Triton's interpreter, seconds

For each batch size and context (every sequence at that length; the block table is ``--max-len``
wide, as the engine's is the context window, since the split policy reads that width) it records
(names with ``_t{N}`` after the context for ``--tokens N`` > 1):
``decode_attn_b{B}_ctx{C}_rel_err``, the split kernel's relative L2 error against the PyTorch
attention (baseline: the one-pass kernel's); ``decode_attn_b{B}_ctx{C}_us``, the split-K path as
``TritonOps.attention`` takes it (the policy's split count, or the one-pass kernel where it says 1)
against the one-pass kernel; and ``decode_attn_b{B}_ctx{C}_sweep_best_us``, the fastest fixed split
count (named in the unit) against the policy's choice: tune ``SplitPolicy`` until the two agree.
``--timer events`` is ``triton.testing.do_bench`` (L2 flushed before each call: a layer's cache is
cold in a real step); ``graph`` times replays of a CUDA graph of the call, as the engine runs it
(each kernel launch in a graph costs ~2 us, which the split path pays twice). ``--fp8`` stores the
cache in fp8 (``kv_scale`` 0.5). ``--tiny``: TRITON_INTERPRET=1, a 4-head model, agreement only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from lmforge.core.errors import ConfigError

BENCH = "serve_attention"


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    page: int


LLAMA_1B = Shape(32, 4, 64, 16)
TINY = Shape(4, 2, 16, 4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def decode_step(shape: Shape, batch: int, context: int, max_len: int, cache_dtype: torch.dtype, kv_scale: float,
                dtype: torch.dtype, device: torch.device, tokens: int = 1):
    """(q, keys, values, table, layout): ``batch`` sequences of ``context`` positions on shuffled pages,
    a table ``max_len`` wide, ``tokens`` query tokens each in one block (the last at position ``context - 1``)."""
    from lmforge.serving.model.ops import StepLayout, store_kv

    width = -(-max_len // shape.page)
    used = -(-context // shape.page)
    pages = torch.randperm(batch * used + 1, device=device)[: batch * used].reshape(batch, used)
    table = torch.zeros(batch, width, dtype=torch.int32, device=device)
    table[:, :used] = pages.int()
    slots = (batch * used + 1) * shape.page
    caches = []
    for _ in range(2):
        cache = torch.zeros(slots, shape.kv_heads, shape.head_dim, dtype=cache_dtype, device=device)
        values = torch.randn(slots, shape.kv_heads, shape.head_dim, dtype=dtype, device=device)
        store_kv(cache, torch.arange(slots, device=device), values, kv_scale)  # as the runner writes (an fp8 view)
        caches.append(cache)
    q = torch.randn(batch * tokens, shape.heads, shape.head_dim, dtype=dtype, device=device)
    layout = StepLayout.build([(i, context - tokens, [0] * tokens) for i in range(batch)], device, tokens, None)
    return q, caches[0], caches[1], table, layout


def timer(kind: str) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of a call, by CUDA events around each call or by replays of a CUDA graph."""
    import triton.testing

    if kind == "events":
        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return lambda fn: 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def measure(args: argparse.Namespace, shape: Shape, device: torch.device, put: Callable[..., None]) -> list[str]:
    """Record every case; returns the cases whose split output disagrees with the PyTorch attention."""
    from lmforge.serving.kernels.decode_attention import SplitPolicy, multiprocessors, split_decode_attention
    from lmforge.serving.model.ops import Ops, TritonOps

    policy = SplitPolicy(waves=args.waves, max_splits=args.max_splits, block_n=args.block_n)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cache_dtype, kv_scale = (torch.float8_e4m3fn, 0.5) if args.fp8 else (dtype, 1.0)
    ref_ops, one_pass_ops, split_ops = Ops(), TritonOps(SplitPolicy(waves=1e-9)), TritonOps(policy)
    for ops in (ref_ops, one_pass_ops, split_ops):
        ops.kv_scale = kv_scale
    assert one_pass_ops.split.splits(1, shape.kv_heads, args.max_len, 10**6) == 1  # never splits
    time_us = None if args.tiny else timer(args.timer)
    sms = multiprocessors(device)
    tag = "_fp8" if args.fp8 else ""
    sweep = (2, 4) if args.tiny else (2, 4, 8, 16, 32, 64)  # the interpreter runs every program in numpy
    # bf16 outputs differ from the PyTorch ones by rounding alone (~3e-3); the split kernel may not be worse
    # than the one-pass kernel beyond that. fp32 in the interpreter agrees to ~1e-7.
    tolerance = 1e-5 if args.tiny else 1e-2
    failed: list[str] = []
    for batch in args.batches:
        for context in args.contexts:
            q, kc, vc, table, layout = decode_step(shape, batch, context, args.max_len, cache_dtype, kv_scale, dtype,
                                                   device, args.tokens)
            scale = shape.head_dim**-0.5
            chosen = policy.splits(batch, shape.kv_heads, args.max_len, sms)
            counts = sorted({*sweep, chosen} - {1})

            step = (q, kc, vc, table, layout, shape.page, scale)
            one_pass, split_path = partial(one_pass_ops.attention, *step), partial(split_ops.attention, *step)
            fixed = {n: partial(split_decode_attention, q, kc, vc, table, layout.positions, layout.blk_row,
                                layout.blk_tok, layout.blk_n, args.tokens, n, shape.page, scale, kv_scale, policy)
                     for n in counts}
            ref = ref_ops.attention(q, kc, vc, table, layout, shape.page, scale)
            errors = [rel_err(fn(), ref) for fn in fixed.values()] + [rel_err(split_path(), ref)]
            name = f"decode_attn_b{batch}_ctx{context}{f'_t{args.tokens}' if args.tokens > 1 else ''}{tag}"
            put(f"{name}_rel_err", max(errors), f"max relative L2 error vs PyTorch over splits {counts}",
                "one-pass kernel", rel_err(one_pass(), ref))
            if not max(errors) <= tolerance:  # NaN fails too
                failed.append(f"{name}: relative error {max(errors):.3g} > {tolerance:g}")
            if time_us is None:
                continue
            base_us = time_us(one_pass)
            put(f"{name}_us", time_us(split_path), f"us (policy: {chosen} splits)", "one-pass paged_attention",
                base_us)
            swept = {n: time_us(fn) for n, fn in fixed.items()}
            best = min(swept, key=swept.__getitem__)
            put(f"{name}_sweep_best_us", swept[best], f"us ({best} splits)", f"policy's {chosen} splits",
                swept.get(chosen, base_us))
            print(f"  b{batch} ctx{context}: one-pass {base_us:.1f} us, " + ", ".join(
                f"{n}: {t:.1f}" for n, t in swept.items()), flush=True)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=1, help="query tokens per sequence (k + 1: a verify step)")
    parser.add_argument("--max-len", type=int, default=4096, help="the block table's width in positions")
    parser.add_argument("--fp8", action="store_true", help="an fp8 (e4m3) cache, kv_scale 0.5")
    parser.add_argument("--timer", choices=["events", "graph"], default="events")
    parser.add_argument("--waves", type=float, default=2.0, help="SplitPolicy.waves")
    parser.add_argument("--max-splits", type=int, default=16, help="SplitPolicy.max_splits")
    parser.add_argument("--block-n", type=int, default=32, help="SplitPolicy.block_n")
    add_common_arguments(parser, "CPU: Triton's interpreter, a 4-head model, batches 1 and 3 at context 37 "
                                 "(2 to 4 splits, page and tile edges); agreement only, no timing")
    args = parser.parse_args()
    if args.tiny:
        # Read when Triton compiles a kernel, so before lmforge's kernels are imported (measure imports them).
        os.environ["TRITON_INTERPRET"] = "1"
        args.batches, args.contexts, args.max_len, args.block_n = [1, 3], [37], 40, 16
        shape, device = TINY, torch.device("cpu")
    elif not torch.cuda.is_available():
        raise ConfigError("no CUDA device: the kernels are timed on a GPU", "run on a GPU machine, or add --tiny")
    else:
        shape, device = LLAMA_1B, torch.device("cuda")
    if not 1 <= args.tokens <= min(args.contexts):
        raise ConfigError(f"--tokens {args.tokens} is not between 1 and the shortest context ({min(args.contexts)})",
                          "give --tokens 1 (decode) or k + 1 of a verify step, at most the shortest --contexts")
    if max(args.contexts) > args.max_len:
        raise ConfigError(f"a context of {max(args.contexts)} does not fit --max-len {args.max_len}",
                          "raise --max-len or drop the longer --contexts")
    out = out_dir(args)
    label = f"{torch.cuda.get_device_name(0)}, timer {args.timer}" if device.type == "cuda" else \
        "cpu (--tiny check, Triton interpreter)"

    def put(metric: str, value: float, unit: str, baseline: str, baseline_value: float | None) -> None:
        record(BENCH, metric, value, unit, baseline, baseline_value, device=label, higher_is_better=False,
               out_dir=out)
        print(f"{metric}: {value:.4g} {unit} (baseline {baseline}: {baseline_value})", flush=True)

    with torch.inference_mode():
        failed = measure(args, shape, device, put)
    print(f"records in {out / (BENCH + '.jsonl')}")
    for line in failed:
        print(f"error: split-K output disagrees with the PyTorch attention, {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
