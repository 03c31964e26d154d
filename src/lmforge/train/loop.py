"""The training loop: one explicit function, used for pretraining and fine-tuning alike.

:func:`train_phase` is the whole of optimization; read it top to bottom. Whether it runs in-line
or as one of several Ray Train workers, it only notices a difference through
``torch.distributed.is_initialized()``: then the model is wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmforge.config.stages import PhaseConfig, TrainingConfig
from lmforge.errors import TrainingDiverged
from lmforge.train.data import IGNORE_INDEX, Tensors

MIN_LR_RATIO = 0.1  # decaying schedules end at a tenth of the peak rate, as nanoGPT does


def train_phase(model: torch.nn.Module, name: str, phase: PhaseConfig, training: TrainingConfig,
                batches: Iterator[Tensors], val_batches: list[Tensors], device: torch.device,
                on_log: Callable[[dict], None] | None = None,
                step_offset: int = 0) -> tuple[list[dict], dict[str, float]]:
    """Run ``phase.steps`` optimizer steps on ``model`` in place; return (history, metrics).

    History rows are ``{step, phase, loss, lr, tokens_per_s}`` every ``training.log_every`` steps
    (and at the first and last step), ``step`` counted from ``step_offset`` so that phases share
    one axis in the tracker. Losses and token counts are averaged over all ranks, so every rank
    holds the same history and raises the same error.
    """
    torch.manual_seed(training.seed)
    ddp = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if ddp else 1
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp else model
    optimizer = adamw(model, phase.learning_rate, training.weight_decay, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, phase))
    history: list[dict] = []
    window: list[float] = []
    tokens, started = 0.0, time.perf_counter()
    net.train()
    for step in range(1, phase.steps + 1):
        stats = torch.zeros(2, device=device)  # [loss over this step's micro-batches, tokens]
        for micro in range(phase.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            # Gradients are all-reduced only on the last micro-batch of an accumulated step.
            sync = not ddp or micro == phase.grad_accum - 1
            with nullcontext() if sync else net.no_sync():
                with _autocast(device):
                    loss = net(**batch).loss / phase.grad_accum
                loss.backward()
            stats += torch.stack([loss.detach().float(), batch["attention_mask"].sum().float()])
        if ddp:
            dist.all_reduce(stats)
            stats[0] /= world
        loss_value = stats[0].item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"{name} step {step}: loss {loss_value}, gradient norm {grad_norm.item()} (not finite)",
                f"lower training.{name}.learning_rate (now {phase.learning_rate:g}), raise "
                f"training.{name}.warmup_steps, or clip harder (training.grad_clip, now {training.grad_clip:g})")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss_value)
        tokens += stats[1].item()
        if step == 1 or step % training.log_every == 0 or step == phase.steps:
            record = {"step": step_offset + step, "phase": name, "loss": sum(window) / len(window), "lr": lr,
                      "tokens_per_s": tokens / (time.perf_counter() - started)}
            history.append(record)
            window = []
            if on_log is not None:
                on_log(record)
    metrics = {f"{name}_loss": history[-1]["loss"]} if history else {}
    val_loss = evaluate_loss(model, val_batches, device)
    if val_loss is not None:
        metrics[f"{name}_val_loss"] = val_loss
    return history, metrics


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[Tensors], device: torch.device) -> float | None:
    """Mean next-token loss per predicted token over all ranks' batches; None when there are none."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # [summed loss, predicted tokens]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device):
            loss = model(**batch).loss
        # The model shifts labels by one; the loss is a mean over the positions it predicted.
        predicted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if predicted:
            totals += torch.stack([loss.double() * predicted, predicted.double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms and biases); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def lr_factor(step: int, phase: PhaseConfig) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step ``step``."""
    if step < phase.warmup_steps:
        return (step + 1) / phase.warmup_steps
    if phase.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - phase.warmup_steps) / max(1, phase.steps - phase.warmup_steps))
    if phase.schedule == "linear":
        return 1.0 - (1.0 - MIN_LR_RATIO) * progress
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only: CPU autocast is slower than fp32 for these small matrices.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
