"""When checkpoints fall (steps, minutes of training) and which stopped run `--resume` without an id picks."""

from __future__ import annotations

import os

import pytest
import torch

from lmforge.config.training import CheckpointingConfig
from lmforge.core.errors import ConfigError
from lmforge.core.workspace import Workspace
from lmforge.train import cadence
from lmforge.train.cadence import CheckpointCadence
from lmforge.train.recovery import LATEST_RUN, RAY_SNAPSHOT, ray_storage, resolve_resume

CPU = torch.device("cpu")


def test_step_cadence_saves_every_n_steps():
    every = CheckpointCadence(CheckpointingConfig(every=3, every_minutes=0), log_every=1, ddp=False, device=CPU)
    assert [step for step in range(1, 10) if every.due(step)] == [3, 6, 9]


def test_time_cadence_saves_at_the_first_logged_step_past_the_mark(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(cadence.time, "monotonic", lambda: now[0])
    timed = CheckpointCadence(CheckpointingConfig(every_minutes=1), log_every=5, ddp=False, device=CPU)
    due = []
    for step in range(1, 31):
        now[0] += 7.0  # seconds per step: the minute passes during step 9, the first logged step after is 10
        if timed.due(step):
            due.append(step)
    assert due == [10, 20, 30]  # the clock restarts at each checkpoint


def test_default_checkpointing_is_on_by_time():
    default = CheckpointingConfig()
    assert default.enabled and default.every == 0 and default.every_minutes == 10 and default.max_failures == 2
    assert not CheckpointingConfig(every_minutes=0).enabled


def test_resume_latest_picks_the_newest_run_of_either_kind(tmp_path):
    ws = Workspace(tmp_path / "home")
    with pytest.raises(ConfigError) as err:
        resolve_resume(ws, LATEST_RUN)
    assert "--resume RUN_ID" in err.value.fix
    inline = ws.checkpoints_dir / "inline-run"
    inline.mkdir(parents=True)
    (inline / "latest.json").write_text("{}")
    os.utime(inline / "latest.json", (1000, 1000))
    ray_run = tmp_path / "home" / "ray" / "train" / "ray-run"
    ray_run.mkdir(parents=True)
    (ray_run / RAY_SNAPSHOT).write_text("{}")
    os.utime(ray_run / RAY_SNAPSHOT, (2000, 2000))
    (ray_run.parent / "no-checkpoint-yet").mkdir()  # a Ray run that registered none is not resumable
    assert ray_storage(ws).endswith("ray/train")
    assert resolve_resume(ws, LATEST_RUN) == "ray-run"
    os.utime(inline / "latest.json", (3000, 3000))
    assert resolve_resume(ws, LATEST_RUN) == "inline-run"
    assert resolve_resume(ws, "given-id") == "given-id" and resolve_resume(ws, None) is None
