"""The time-boxed training loop of the models benchmarks train inside their job (``bench.serve.quant``'s
byte-level Llama, ``bench.serve.copy_task``'s copier): AdamW, a linear warm-up then a cosine over the
time box (not a step count: the box is what a job can afford), bf16 autocast on CUDA, gradients clipped
at 1."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def train_timed(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], *, lr: float, warm: int, seconds: float,
                cuda: bool, weight_decay: float = 0.0, max_steps: int | None = None) -> tuple[int, float, float]:
    """Train ``model`` in place for ``seconds`` (or ``max_steps`` steps if fewer); ``loss_of()`` draws a batch
    and returns its loss. Returns (steps, seconds taken, last loss). The optimizer's moments (twice the
    weights) and the gradients are gone on return, before the caller's engines size their caches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=cuda)
    start, step, loss = time.perf_counter(), 0, torch.tensor(0.0)
    while time.perf_counter() - start < seconds and (max_steps is None or step < max_steps):
        frac = min(1.0, (time.perf_counter() - start) / seconds)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    took = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return step, took, float(loss.detach())
