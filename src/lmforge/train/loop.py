"""The training loop: one explicit function, used for every phase, method and scale.

:func:`train_phase` is the whole of optimization; read it top to bottom. It runs in-line or as one of several DDP ranks, or
FSDP2 ones (:mod:`lmforge.train.parallel`); it notices only ``torch.distributed.is_initialized()``. The loss of a step is
the mean over the target tokens of all its micro-batches on all ranks, so gradient accumulation and more workers give the
gradient of one large batch. Losses stay on the device and are read (one synchronization) only at log, validation and
checkpoint steps: that is also where a NaN or infinite loss is caught, before a checkpoint could keep it, with the exact
step it first appeared.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmforge.config.training import PhaseConfig, TrainingConfig
from lmforge.core.errors import ConfigError, TrainingDiverged
from lmforge.train import checkpoint as ckpt
from lmforge.train import parallel, pipeline, tensor_parallel, zero
from lmforge.train.accel import speed
from lmforge.train.cadence import CheckpointCadence
from lmforge.train.objective import CausalLMObjective
from lmforge.train.preference import PreferenceObjective

if TYPE_CHECKING:
    from lmforge.model.types import CausalLM

MIN_LR_RATIO = 0.1  # decaying schedules end at a tenth of the peak rate, as nanoGPT does
Tensors = dict[str, torch.Tensor]
# (step, tensor groups, loop state) -> path of the checkpoint written (None on ranks that do not write)
SaveFn = Callable[[int, dict[str, Tensors], dict[str, Any]], Path | None]


def train_phase(model: CausalLM, name: str, phase: PhaseConfig, training: TrainingConfig,
                batches: Iterator[Tensors], val_batches: list[Tensors], device: torch.device,
                on_log: Callable[[dict], None] | None = None, step_offset: int = 0,
                save: SaveFn | None = None, resume: ckpt.Checkpoint | None = None) -> tuple[list[dict], dict[str, float]]:
    """Run ``phase.steps`` optimizer steps on ``model`` in place; return (history, metrics).

    History rows are ``{step, phase, loss, lr, tokens_per_s}`` every ``training.logging.every`` steps
    (and at the first and last step), ``step`` counted from ``step_offset``; preference tuning adds
    its rewards (:data:`lmforge.train.preference.METRICS`), means over the steps since the last row. ``batches`` must
    already be past the steps a ``resume`` checkpoint has done; ``save`` writes checkpoints.
    ``on_log`` receives each history row as it is made and, at each validation (before the first
    step, every ``training.validation.every`` steps, after the last), ``{step, phase,
    <phase>_val_loss}`` (and ``<phase>_val_<metric>``): :func:`is_history_row` tells them apart.
    """
    torch.manual_seed(training.seed)
    # One Ray worker still gets a process group; DDP over a single rank would only add its hooks
    # (and rule out CUDA graphs), so the loop treats it as one process.
    ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world = dist.get_world_size() if ddp else 1
    objective, graphs = _objective(model, name, phase, training, device, ddp)
    objective, pipe = pipeline.split(objective, model, training, phase, device)  # pipeline_parallel: this worker's stages
    sharded = pipe is not None or parallel.shard(objective, model, training, device)  # FSDP2 or DDP; the optimizer gets shards
    ddp_net = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp and not sharded and not zero.enabled(training) else None
    net: torch.nn.Module = ddp_net if ddp_net is not None else objective
    optimizer = adamw(model, phase.learning_rate, training.optimizer.weight_decay, device,
                      training.speed.compile_optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, phase))
    net, update = zero.wrap(net, optimizer, phase, training, device) or (net, _update(model, optimizer, training, graphs, pipe))
    copies = tensor_parallel.degree(training) * pipeline.degree(training)
    run = _PhaseRun(name, phase, training, step_offset, on_log, objective.metric_names, pipe)
    cadence = CheckpointCadence(training.checkpointing, training.logging.every, ddp, device) if save else None
    if resume is not None:
        run.restore(resume, model, optimizer, schedule)
    else:
        start = evaluate(objective, val_batches, device)
        run.metrics.update({f"{name}_{key}_start": value for key, value in start.items()})
        run.report_validation(start)
    # Peak rates as plain floats, fresh or resumed: the same arithmetic either way, so a resumed
    # run's rates (and weights) match an uninterrupted one's to the bit, tensor rates included.
    rebase_schedule(optimizer, schedule, phase)
    net.train()
    for step in range(run.step + 1, phase.steps + 1):
        micro = [next(batches) for _ in range(phase.grad_accum)]
        # [summed loss, tokens seen (once per tensor-parallel group), target tokens (pairs)]; targets global before backward.
        seen = sum(b["input_ids"].numel() for b in micro) / copies
        stats = to_device(torch.tensor([0.0, seen, objective.units(micro)]), device)
        sums = torch.zeros(len(objective.metric_names), device=device) if objective.metric_names else None
        if ddp:
            dist.all_reduce(stats[2:])
        if pipe is not None:  # the schedule runs all the step's micro-batches through the stages
            stats[0] += pipe.step(micro, stats[2])
        for i, batch in enumerate(micro if pipe is None else []):
            if graphs:  # a new step: the graphs' previous outputs (loss, gradients) are consumed by now
                torch.compiler.cudagraph_mark_step_begin()
            # Gradients are all-reduced only on the last micro-batch of an accumulated step.
            with nullcontext() if ddp_net is None or i == len(micro) - 1 else ddp_net.no_sync():
                with autocast(device), speed.attention_kernels(training.speed.attention_backend, device):
                    out = net(**model_inputs(batch, device))
                loss_sum = out[0] if out.dim() else out  # a vector: the loss, then the objective's metrics
                zero.backward(net, loss_sum * world / stats[2])
            stats[0] += loss_sum.detach()
            if sums is not None:
                sums += out[1:].detach()
        if ddp:
            dist.all_reduce(stats[:2])
            if sums is not None:
                dist.all_reduce(sums)
        grad_norm = update()  # clip, then AdamW
        run.pending.append((step, stats[0] / stats[2], grad_norm, stats[1], None if sums is None else sums / stats[2]))
        run.lr = schedule.get_last_lr()[0]  # the rate this step ran at (a copy, if a tensor), before it moves on
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        run.step = step
        evaluating = training.validation.every and step % training.validation.every == 0 and step < phase.steps
        saving = cadence is not None and cadence.due(step)
        if step == 1 or step % training.logging.every == 0 or step == phase.steps or evaluating or saving:
            run.check_and_log()  # one synchronization; raises TrainingDiverged
        if evaluating and run.validate(evaluate(objective, val_batches, device), model):
            break  # early stopping: the best weights are back in the model
        if saving and save is not None:  # saving implies save; restated so the type checker knows
            run.last_checkpoint = save(step, *run.snapshot(model, optimizer, schedule))
    run.check_and_log(final=True)
    if run.history:
        run.metrics.update({f"{name}_{key}": run.history[-1][key] for key in ("loss", *objective.metric_names)})
    end = evaluate(objective, val_batches, device)
    run.metrics.update({f"{name}_{key}": value for key, value in end.items()})
    run.report_validation(end)
    return run.history, {k: v for k, v in run.metrics.items() if v is not None}


def _objective(model: CausalLM, name: str, phase: PhaseConfig, training: TrainingConfig,
               device: torch.device, ddp: bool) -> tuple[CausalLMObjective | PreferenceObjective, bool]:
    """The loss module, compiled as the config asks, and whether each step replays as CUDA graphs."""
    if name == "finetune" and training.preference.loss is not None:  # the config refuses whole-model graphs here
        return PreferenceObjective(model, training.preference.loss, training.preference.beta,
                                   compile_chunks=training.speed.compile and device.type == "cuda"), False
    whole = training.speed.compile and training.speed.compile_scope == "model"
    speed.check_loss_kernel(training.loss.kernel, device)
    # A whole-objective graph takes the plain loss (the compiler fuses the cross-entropy itself),
    # unless the loss is Liger's kernel: then the graph ends at the hidden states and Liger takes over.
    fused = training.loss.fused and (not whole or training.loss.kernel == "liger")
    objective = CausalLMObjective(model, training.loss.label_smoothing, fused,
                                  compile_chunks=training.speed.compile and device.type == "cuda",
                                  kernel=training.loss.kernel)
    graphs = whole and training.speed.cuda_graphs and device.type == "cuda"
    if graphs and ddp:
        raise ConfigError("training.speed.cuda_graphs is for one process per run for now: DDP's gradient "
                          "all-reduce runs outside the recorded graphs",
                          "set training.speed.cuda_graphs: false for several workers")
    if graphs and phase.grad_accum > 1:
        raise ConfigError(f"training.speed.cuda_graphs replays one micro-batch per step, but {name} has grad_accum "
                          f"{phase.grad_accum}", f"set training.{name}.grad_accum: 1 (raise batch_size instead), "
                          "or training.speed.cuda_graphs: false")
    if whole:
        # reduce-overhead: torch.compile records the step's kernels as CUDA graphs and replays them.
        objective.compile(mode="reduce-overhead" if graphs else None)
    return objective, graphs


def _update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, training: TrainingConfig,
            graphs: bool, pipe: pipeline.Pipeline | None = None) -> Callable[[], torch.Tensor]:
    """The step's update: clip the gradients, step the optimizer; return the norm before clipping.

    With ``training.speed.compile_optimizer`` it is one compiled graph (the foreach AdamW and the norm
    fused by the compiler; under CUDA graphs replayed with the step's other graphs, so no launch
    gaps remain between them).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    clip = parallel.clip_grad_norm_ if parallel.sharding(training) else torch.nn.utils.clip_grad_norm_
    clip = clip if pipe is None else pipe.clip_grad_norm_  # the norm over all stages' gradients

    def update() -> torch.Tensor:
        norm = clip(params, training.optimizer.grad_clip)
        optimizer.step()
        return norm

    if not training.speed.compile_optimizer:
        return update
    # Each phase's new optimizer compiles this function twice more (its first step builds the state);
    # past dynamo's limit the step would silently run eagerly, so allow many phases in one process.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(update, mode="reduce-overhead" if graphs else None)
    # A CUDA graph's output is overwritten by its next replay; the norm is read steps later.
    return lambda: compiled().clone()


class _PhaseRun:
    """What the loop remembers between steps: pending losses, history, validation record."""

    def __init__(self, name: str, phase: PhaseConfig, training: TrainingConfig, step_offset: int,
                 on_log: Callable[[dict], None] | None, metric_names: tuple[str, ...] = (),
                 pipe: pipeline.Pipeline | None = None) -> None:
        self.name, self.phase, self.training, self.offset, self.on_log = name, phase, training, step_offset, on_log
        self.metric_names, self.pipe = metric_names, pipe  # a pipeline gathers and cuts state over its stages
        self.metric_window: list[list[float]] = []  # the objective's metrics per step, as window holds the loss
        self.step, self.tokens, self.started = 0, 0.0, time.perf_counter()
        self.lr: float | torch.Tensor = 0.0  # a tensor under training.speed.compile_optimizer
        self.pending: list[tuple] = []
        self.window: list[float] = []
        self.history: list[dict] = []
        self.metrics: dict[str, Any] = {}
        self.best_val, self.bad_evals = math.inf, 0
        self.best_state: Tensors | None = None
        self.last_checkpoint: Path | None = None

    def check_and_log(self, final: bool = False) -> None:
        if self.pending:
            rows = torch.stack([torch.cat([torch.stack([loss.float(), n.float(), t.float()]), *([] if m is None else [m])])
                                for _, loss, n, t, m in self.pending]).tolist()
            for (step, *_), (loss, norm, tokens, *values) in zip(self.pending, rows):
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    self._diverged(step, loss, norm)
                self.window.append(loss)
                self.metric_window += [values] if values else []
                self.tokens += tokens
            self.pending = []
        step = self.step
        if self.window and (step == 1 or step % self.training.logging.every == 0 or step == self.phase.steps or final):
            record = {"step": self.offset + step, "phase": self.name, "loss": sum(self.window) / len(self.window),
                      "lr": float(self.lr), "tokens_per_s": self.tokens / (time.perf_counter() - self.started)}
            record.update({key: sum(col) / len(col) for key, col in zip(self.metric_names, zip(*self.metric_window))})
            self.history.append(record)
            self.window, self.metric_window = [], []
            if self.on_log is not None:
                self.on_log(record)

    def report_validation(self, values: dict[str, float]) -> None:
        """Validation values (:func:`evaluate`) to ``on_log`` (live tracking), at the step the weights have reached."""
        if values and self.on_log is not None:
            self.on_log({"step": self.offset + self.step, "phase": self.name,
                         **{f"{self.name}_{key}": value for key, value in values.items()}})

    def _diverged(self, step: int, loss: float, norm: float) -> None:
        name, phase, training = self.name, self.phase, self.training
        kept = (f"the last good checkpoint is {self.last_checkpoint} (resume from it with --resume)"
                if self.last_checkpoint else "no checkpoint was written before it (training.checkpointing)")
        raise TrainingDiverged(
            f"{name} step {step}: loss {loss}, gradient norm {norm} (not finite); {kept}",
            f"lower training.{name}.learning_rate (now {phase.learning_rate:g}), raise "
            f"training.{name}.warmup_steps, or clip harder (training.optimizer.grad_clip, now "
            f"{training.optimizer.grad_clip:g})")

    def validate(self, values: dict[str, float], model: torch.nn.Module) -> bool:
        """Record a validation (:func:`evaluate`); True when early stopping ends the phase (best weights restored)."""
        val_loss = values.get("val_loss")
        if val_loss is None:
            return False
        self.report_validation(values)
        patience = self.training.validation.early_stopping_patience
        if val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            self.metrics[f"{self.name}_val_loss_best"] = val_loss
            if patience:
                self.best_state = (self.pipe or parallel).full_state(zero.trainable_state(model))  # host copies, gathered
            return False
        self.bad_evals += 1
        if not patience or self.bad_evals < patience:
            return False
        # None only when no loss was ever finite, or a resumed checkpoint kept no best weights (patience was 0).
        if self.best_state is not None:
            (self.pipe or ckpt).load_trainable(model, self.best_state)
        self.metrics[f"{self.name}_stopped_early_at"] = float(self.offset + self.step)
        return True

    def snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict[str, Tensors], dict[str, Any]]:
        groups, meta = (self.pipe or zero).capture(model, optimizer, ckpt.writes_sharded(self.training))  # meta: optimizer, rng
        if self.best_state is not None:
            groups["best"] = self.best_state
        state = {"step": self.step, "lr": float(self.lr), "window": self.window, "metric_window": self.metric_window,
                 "history": self.history,
                 "metrics": self.metrics, "best_val": self.best_val, "bad_evals": self.bad_evals,
                 "schedule": schedule.state_dict(), **meta}
        return groups, state

    def restore(self, saved: ckpt.Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
        state = saved.state["loop"]
        (self.pipe or zero).restore(saved, model, optimizer)  # either format, into this run's layout
        schedule.load_state_dict(state["schedule"])  # its peak rate is then the phase's (rebase_schedule)
        self.step, self.lr, self.window = state["step"], state["lr"], list(state["window"])
        self.metric_window = list(state.get("metric_window", []))
        self.history, self.metrics = list(state["history"]), dict(state["metrics"])
        self.best_val, self.bad_evals, self.best_state = state["best_val"], state["bad_evals"], saved.tensors.get("best")
        self.last_checkpoint = saved.path


def is_history_row(record: dict) -> bool:
    """True for a training history row, false for a validation record (see :func:`train_phase`)."""
    return "loss" in record


def rebase_schedule(optimizer: torch.optim.Optimizer, schedule, phase: PhaseConfig) -> None:
    """The schedule's peak rate is this phase's, as a float. A resumed checkpoint keeps the
    schedule's position, but the resumed run chooses the peak (a loss spike is often resumed at
    a lower one); fresh runs come here too, so both compute their rates alike."""
    schedule.base_lrs = [phase.learning_rate] * len(optimizer.param_groups)
    now = phase.learning_rate * lr_factor(schedule.last_epoch, phase)  # the rate of the next step
    for group in optimizer.param_groups:
        for key, value in (("initial_lr", phase.learning_rate), ("lr", now)):
            if isinstance(group.get(key), torch.Tensor):  # a compiled step's rate: filled, never replaced
                group[key].fill_(value)
            else:
                group[key] = value
    # What get_last_lr() reports, as LRScheduler.step() records it (copies of tensor rates).
    schedule._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in optimizer.param_groups]


def model_inputs(batch: Tensors, device: torch.device) -> Tensors:
    """Device tensors for the objective, without an attention mask where causality makes it moot.

    Packed rows have no padding, and right padding only follows the real tokens, which causal
    attention never lets them see: dropping the mask keeps SDPA on its flash-attention path.
    """
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    if "reference_logps" in batch:  # preference pairs: DPO's reference scores (lmforge.train.preference_data)
        inputs["reference_logps"] = batch["reference_logps"]
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[..., 1:] > mask[..., :-1]).any()):
        inputs["attention_mask"] = mask
    return {k: to_device(v, device) for k, v in inputs.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, sent without making the host wait for the GPU.

    The host must run ahead of the GPU, queueing the next step while this one computes. A copy
    from ordinary (pageable) memory goes through a driver staging buffer and can hold the host
    until the GPU's queue reaches it, leaving the GPU idle while the next step is prepared; from
    page-locked memory it is one asynchronous transfer (as a DataLoader with pin_memory does).
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def evaluate(objective: CausalLMObjective | PreferenceObjective, batches: list[Tensors],
             device: torch.device) -> dict[str, float]:
    """``{"val_loss", "val_<metric>" ...}``: the mean loss (and metrics) per unit (predicted token, or
    pair) over all ranks' batches; empty when there are none."""
    was_training = objective.training
    objective.eval()
    names = ("val_loss", *(f"val_{m}" for m in objective.metric_names))
    totals = torch.zeros(len(names) + 1, device=device, dtype=torch.float64)  # [summed loss, units, summed metrics]
    for batch in batches:
        if device.type == "cuda":  # under training.speed.cuda_graphs, an evaluation is a graph step of its own
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device):
            out = objective(**model_inputs(batch, device)).double().reshape(-1)
        units = to_device(torch.tensor([objective.units([batch])], dtype=torch.float64), device)  # as in a step
        totals += torch.cat([out[:1], units, out[1:]])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    objective.train(was_training)
    if not totals[1] > 0:
        return {}
    return dict(zip(names, (torch.cat([totals[:1], totals[2:]]) / totals[1]).tolist()))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
          compiled: bool = False) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norms and biases); fused kernels on CUDA.

    ``compiled``: for a compiled step, foreach (the compiler fuses it) with the learning rate as
    a device tensor, which the schedule fills in place: a float would be a constant of the
    graph, recompiled at every change.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if compiled:  # capturable: the step counts stay on the GPU too (CPUs take the one-tensor-at-a-time form)
        cuda = device.type == "cuda"
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=torch.tensor(lr, device=device),
                                 betas=(0.9, 0.95), foreach=cuda, capturable=cuda)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95),
                             **parallel.adamw_kernels(params, device))


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


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    # bf16 autocast on CUDA only: CPU autocast is slower than fp32 for these small matrices.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
