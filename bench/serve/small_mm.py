"""Few-row matmul micro-benchmark: ``small_mm`` (``kernels/quant.py``), the Triton kernel the decode
graphs take for dense half-precision weights at up to 64 rows, against cuBLAS (``F.linear``) on the
Llama-1.1B's decode shapes (bf16): QKV, attention output, gate/up, down and the output head.

    PYTHONPATH=src:. python -m bench.serve.small_mm [--rows 1 8 64] [--out DIR]

Each call is timed as the engine runs it, replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``),
and over enough copies of the weight (one call each, the time divided by the copies) that they do
not fit the GPU's L2 cache: a decode step reads each weight once, from memory. Per shape and row count
it records ``small_mm_{shape}_m{rows}_us`` (the default config, baseline cuBLAS),
``..._sweep_best_us`` (the fastest of a small config sweep, named in the unit, baseline the default)
and ``..._rel_err`` (against cuBLAS). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from lmforge.core.errors import ConfigError

BENCH = "serve_small_mm"
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
          "lm_head": (32000, 2048)}  # (N, K) of the 1.1B
L2_BYTES = 50 * 2**20  # an H100's L2; the copies of a weight span at least three times it


def sweep(rows: int) -> list[dict[str, int]]:
    """The configs tried at ``rows`` (some may not fit a GPU's shared memory: skipped)."""
    block_m, ks = (16, (128, 256, 512)) if rows <= 16 else (64, (64, 128, 256))
    return [dict(BLOCK_M=block_m, BLOCK_N=n, BLOCK_K=k, num_warps=4, num_stages=s)
            for n, k, s in itertools.product((16, 32), ks, (3, 5))]


def timed(fn, copies: int) -> float:
    import triton.testing

    def every() -> None:
        for i in range(copies):
            fn(i)

    return 1e3 * triton.testing.do_bench_cudagraph(every, rep=40, return_mode="median") / copies


def measure(name: str, n: int, k: int, rows: int, gen: torch.Generator, device: str, out) -> None:
    """Record one shape at one row count (see the module docstring)."""
    from lmforge.serving.kernels.quant import small_config, small_mm

    copies = max(2, -(-3 * L2_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = F.linear(x, weights[0]).float()
    err = float((small_mm(x, weights[0]).float() - ref).norm() / ref.norm())
    cublas = timed(lambda i: F.linear(x, weights[i]), copies)
    ours = timed(lambda i: small_mm(x, weights[i]), copies)
    times = {}
    for cfg in sweep(rows):
        try:
            times[str(cfg)] = timed(lambda i, c=cfg: small_mm(x, weights[i], config=c), copies)
        except Exception as exc:  # noqa: BLE001 - a config past the GPU's shared memory is skipped, not fatal
            print(f"  {name} m={rows} {cfg}: {type(exc).__name__}", flush=True)
    best = min(times, key=times.__getitem__)
    gbps = n * k * 2 / ours / 1e3
    tag = f"small_mm_{name}_m{rows}"
    record(BENCH, f"{tag}_us", ours, f"us ({gbps:.0f} GB/s; config {small_config(rows, n, k)})", "cuBLAS F.linear", cublas,
           device=device, higher_is_better=False, out_dir=out)
    record(BENCH, f"{tag}_sweep_best_us", times[best], f"us ({best})", "default config", ours, device=device,
           higher_is_better=False, out_dir=out)
    record(BENCH, f"{tag}_rel_err", err, "relative L2 vs cuBLAS", "", None, device=device, out_dir=out)
    print(f"{name:8s} m={rows:2d}: cuBLAS {cublas:6.2f} us, small_mm {ours:6.2f} us ({gbps:4.0f} GB/s), "
          f"best {times[best]:6.2f} us {best}, err {err:.1e}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "not available: this benchmark needs a CUDA GPU")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    out = out_dir(args)
    if args.tiny or not torch.cuda.is_available():
        raise ConfigError("bench.serve.small_mm needs a CUDA GPU", "run it on a GPU machine")
    from lmforge.serving.kernels.quant import SMALL_ROWS

    if max(args.rows) > SMALL_ROWS:
        raise ConfigError(f"--rows goes past {SMALL_ROWS}, where the engine takes cuBLAS", f"give rows up to {SMALL_ROWS}")
    device = torch.cuda.get_device_name(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (name, (n, k)), rows in itertools.product(SHAPES.items(), args.rows):
        measure(name, n, k, rows, gen, device, out)
    print(f"records in {out}")
    return 0


if __name__ == "__main__":
    run(main)
