"""When the training loop writes a checkpoint: every N steps, every M minutes of training, or both.

Steps are the same on every rank, so a step cadence needs no agreement. A time cadence does: each
rank reads its own clock, and every rank must save at the same step (under Ray each one reports
the checkpoint, a barrier). So the clock is read only at logged steps (``training.logging.every``,
already a synchronization point) and the ranks agree through one tiny all-reduce there. Where a
checkpoint falls never changes what the run learns: saving reads the state, it draws no random number.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lmforge.config.training import CheckpointingConfig


class CheckpointCadence:
    """``due(step)`` says whether the loop saves after ``step``; the clock restarts at each save."""

    def __init__(self, checkpointing: CheckpointingConfig, log_every: int, ddp: bool, device: torch.device) -> None:
        self.every, self.seconds = checkpointing.every, checkpointing.every_minutes * 60
        self.log_every, self.ddp, self.device = log_every, ddp, device
        self.since = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return self._saved()
        if not self.seconds or step % self.log_every:
            return False
        late = time.monotonic() - self.since >= self.seconds
        if self.ddp:  # one rank's clock past the mark is enough: all save at this step
            flag = torch.tensor([float(late)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return self._saved() if late else False

    def _saved(self) -> bool:
        self.since = time.monotonic()
        return True
