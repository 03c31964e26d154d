"""Causal attention kernels for training, forward + backward, on one GPU: SDPA's against FlashAttention-4.

    PYTHONPATH=src python -m bench.train.attention [--kernels math flash cudnn fa4] [--out DIR]

The shapes of issue 5's workloads: GPT-2 124M (batch 16, sequence 1024, 12 heads of 64) and the
Llama-shaped 1.1B (batch 8, sequence 2048, 32 query and 4 key/value heads of 64), bf16. Each kernel
runs forward and backward through autograd; the time is the median of CUDA-event timings. Before
timing, each kernel's output and gradients are compared with a float32 reference (math attention
on the same inputs); the report gives the largest error relative to the reference's largest value,
beside the error of the bf16 math kernel itself (the noise floor of bf16 attention).

TFLOP/s counts the causal work actually done: forward 2·2·B·H·S²·D / 2 (two matrix products, half
the scores masked), backward 2.5 times the forward.

``--tiny`` runs the same code on the CPU with tiny shapes (the cuDNN and FlashAttention-4 kernels
need a GPU: their rows say so), and records SDPA's flash kernel against its math kernel instead.
Figures go to OUT/attention_gpu.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import command_line, record

SHAPES = {"gpt2": (16, 1024, 12, 12, 64), "llama": (8, 2048, 32, 4, 64)}  # batch, seq, heads, kv heads, dim
TINY_SHAPES = {"gpt2": (2, 64, 4, 4, 16), "llama": (2, 64, 4, 2, 16)}
KERNELS = ("math", "flash", "cudnn", "fa4")
# (ours, baseline, the baseline's description): the figures recorded. --tiny: the two kernels a CPU has.
COMPARED = (("fa4", "cudnn", "SDPA cuDNN attention"),)
TINY_COMPARED = (("flash", "math", "SDPA math attention (CPU check)"),)


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "math": SDPBackend.MATH}[backend]

    def run(q, k, v):  # [B, S, H, D] in and out, as the FlashAttention ops take them
        with sdpa_kernel([kind]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
    return run


def fa4(q, k, v):
    from lmforge.train.accel.flash4 import fa4_forward

    return fa4_forward(q, k, v, True, q.shape[-1] ** -0.5)[0]


def inputs(shape, device: str, dtype=torch.bfloat16, seed=0):
    b, s, h, hkv, d = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def make(heads: int) -> torch.Tensor:
        return torch.randn(b, s, heads, d, device=device, dtype=dtype, generator=g)

    q, k, v = make(h), make(hkv), make(hkv)
    grad = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g)
    return q, k, v, grad


def forward_backward(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def errors(fn, shape, device: str) -> list[float]:
    """Largest |kernel - fp32 reference| / largest |reference|, for out, dq, dk, dv."""
    q, k, v, grad = inputs(shape, device)
    ref = forward_backward(_math_fp32, *(t.float() for t in (q, k, v, grad)))
    got = forward_backward(fn, q, k, v, grad)
    return [round(float((g.float() - r).abs().max() / r.abs().max()), 5) for g, r in zip(got, ref)]


def _math_fp32(q, k, v):
    return sdpa("math")(q, k, v)


def timing_ms(fn, shape, device: str, reps: int = 20) -> float:
    q, k, v, grad = inputs(shape, device)
    for _ in range(3):
        forward_backward(fn, q, k, v, grad)
    times = []
    for _ in range(reps):
        if device == "cpu":  # no events on the CPU: the wall clock of the (synchronous) call
            begin = time.perf_counter()
            forward_backward(fn, q, k, v, grad)
            times.append(1000 * (time.perf_counter() - begin))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(fn, q, k, v, grad)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), metavar="KERNEL", help=" ".join(KERNELS))
    add_common_arguments(parser, "tiny shapes on the CPU: a check of this script")
    args = parser.parse_args(argv)
    names = choose(args.kernels, KERNELS, "kernel", "--kernels")
    out = out_dir(args)
    kernels = {"math": sdpa("math"), "flash": sdpa("flash"), "cudnn": sdpa("cudnn"), "fa4": fa4}
    where = "cpu" if args.tiny else "cuda"
    device = "cpu (--tiny check)" if args.tiny else torch.cuda.get_device_name(0)
    command = command_line("PYTHONPATH=src python")
    rows = {}
    for shape_name, shape in (TINY_SHAPES if args.tiny else SHAPES).items():
        b, s, h, _, d = shape
        flops = 2 * 2 * b * h * s * s * d / 2 * 3.5  # forward + backward (2.5x), causal half
        for name in names:
            row = {"shape": shape_name, "kernel": name}
            try:
                row["max_rel_err_out_dq_dk_dv"] = errors(kernels[name], shape, where)
                row["fwd_bwd_ms"] = round(timing_ms(kernels[name], shape, where, reps=3 if args.tiny else 20), 3)
                row["tflops"] = round(flops / row["fwd_bwd_ms"] / 1e9, 1)
            except Exception as exc:  # noqa: BLE001 - one kernel refusing a shape must not cost the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows[(shape_name, name)] = row
            print(json.dumps(row), flush=True)
        for name, baseline, label in TINY_COMPARED if args.tiny else COMPARED:
            ours, base = rows.get((shape_name, name), {}), rows.get((shape_name, baseline), {})
            if "fwd_bwd_ms" in ours and "fwd_bwd_ms" in base:
                record("attention_gpu", f"{shape_name}_causal_attention_fwd_bwd_ms_{name}", ours["fwd_bwd_ms"], "ms",
                       label, base["fwd_bwd_ms"], device=device, higher_is_better=False,
                       command=f"{command}  # max rel. err. vs fp32 {ours['max_rel_err_out_dq_dk_dv']}, bf16 math "
                       f"{rows.get((shape_name, 'math'), {}).get('max_rel_err_out_dq_dk_dv')}", out_dir=out)
    print(f"records in {out}")
    return 0


if __name__ == "__main__":
    run(main)
