"""``training.parallel.strategy: deepspeed``: DeepSpeed ZeRO 2 and 3 in the one training loop, on 2 CPU processes.

Two real processes (torch.multiprocessing, a gloo process group on loopback, no Ray) run
:func:`lmforge.train.loop.train_phase` through DeepSpeed's engine (its CPU accelerator, our torch AdamW, no
compiled op) on a tiny Llama built from config; this process runs the same steps on one plain worker with the
global batch. Their losses, final weights and checkpoints must agree: ZeRO changes where the state lives, never
what the step computes. A checkpoint written under ZeRO holds full tensors and resumes under ddp, and one in that
layout resumes into ZeRO (either stage, any number of workers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import WEIGHT_ATOL, spawn_gloo

from lmforge.config.model import ModelConfig
from lmforge.config.training import (
    CheckpointingConfig,
    LoggingConfig,
    PhaseConfig,
    PlacementConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.model.build import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train import zero
from lmforge.train.loop import train_phase

pytest.importorskip("deepspeed")

VOCAB, WORLD, STEPS, SAVE_AT = 256, 2, 5, 3
STAGES = (2, 3)
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    max_seq_len=32)
PHASE = PhaseConfig(steps=STEPS, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=2, grad_accum=2)


def _training(strategy: str, stage: int = 3) -> TrainingConfig:
    return TrainingConfig.model_validate({
        "method": "pretrain", "parallel": {"strategy": strategy, "deepspeed": {"stage": stage}},
        "placement": PlacementConfig(use_ray=True, num_workers=WORLD).model_dump(), "cpu_threads": 1,
        "logging": LoggingConfig(every=1).model_dump(), "validation": TrainValidationConfig(batches=1).model_dump(),
        "checkpointing": CheckpointingConfig(every=SAVE_AT, every_minutes=0).model_dump()})


def _batches(rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """This rank's share of every micro-batch of the global batch (8 rows each), and of one validation batch."""
    g = torch.Generator().manual_seed(1)
    rows = PHASE.batch_size * WORLD // world

    def share(ids: torch.Tensor) -> dict:
        ids = ids[rank * rows:(rank + 1) * rows]
        return {"input_ids": ids, "labels": ids.clone()}

    micro = [share(torch.randint(0, VOCAB, (PHASE.batch_size * WORLD, PHASE.seq_len), generator=g))
             for _ in range(STEPS * PHASE.grad_accum)]
    return micro, [share(torch.randint(0, VOCAB, (PHASE.batch_size * WORLD, PHASE.seq_len), generator=g))]


def _run(strategy: str, rank: int, world: int, stage: int = 3, resume: ckpt.Checkpoint | None = None) -> dict:
    """train_phase on this rank; returns its history, checkpoints, parameter bytes and full weights."""
    training = _training(strategy, stage)
    torch.manual_seed(0)
    model = build_model(MODEL, VOCAB)
    micro, val = _batches(rank, world)
    saved: dict[int, dict] = {}

    def save(step: int, tensors: dict, state: dict) -> None:
        saved[step] = {"tensors": tensors, "state": state}

    done = resume.state["loop"]["step"] * PHASE.grad_accum if resume else 0
    phase = PHASE.model_copy(update={"batch_size": PHASE.batch_size * WORLD // world})
    history, metrics = train_phase(model, "pretrain", phase, training, iter(micro[done:]), val, torch.device("cpu"),
                                   save=save, resume=resume)
    return {"history": history, "metrics": metrics, "saved": saved, "bytes": zero.local_parameter_bytes(model),
            "weights": zero.full_model_state(model)}


def _zero_runs(rank: int, world: int, tmp: Path) -> dict:
    results: dict = {stage: _run("deepspeed", rank, world, stage) for stage in STAGES}
    # Each stage's step-3 checkpoint (full tensors, as a ddp run's) resumed under the other stage.
    for stage in STAGES:
        root = tmp / f"ckpt-zero{stage}"
        written = results[stage]["saved"][SAVE_AT]
        ckpt.save(root, f"pretrain-{SAVE_AT}", written["tensors"], {"loop": written["state"]}, keep=1)
        dist.barrier()
        other = STAGES[1] if stage == STAGES[0] else STAGES[0]
        results[f"resumed_into_{other}"] = _run("deepspeed", rank, world, other, resume=ckpt.load_latest(root))
    return results


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> dict:
    """Rank 0's results of the 2-process ZeRO runs, by stage (one spawn: the processes' start is the cost)."""
    tmp = tmp_path_factory.mktemp("zero")
    return spawn_gloo(_zero_runs, WORLD, tmp / "results.pt", tmp, label=f"deepspeed ZeRO {STAGES}")


@pytest.fixture(scope="module")
def single() -> dict:
    return _run("ddp", 0, 1)


@pytest.mark.slow  # two gloo processes importing DeepSpeed (its first engine imports inductor): minutes on a busy 2-core machine
@pytest.mark.parametrize("stage", STAGES)
def test_zero_two_workers_match_one_worker(stage, partitioned, single):
    ours = partitioned[stage]
    assert [r["step"] for r in ours["history"]] == list(range(1, STEPS + 1))
    for zero_row, one_row in zip(ours["history"], single["history"], strict=True):
        assert zero_row["loss"] == pytest.approx(one_row["loss"], rel=1e-5), zero_row
    assert ours["metrics"]["pretrain_val_loss"] == pytest.approx(single["metrics"]["pretrain_val_loss"], rel=1e-5)
    # Stage 3 partitions the weights in two; stage 2 keeps a full replica (its optimizer state is what it splits).
    expected = single["bytes"] / WORLD if stage == 3 else single["bytes"]
    assert ours["bytes"] == pytest.approx(expected, rel=0.02)
    assert ours["weights"].keys() == single["weights"].keys()
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ours["weights"][name], weight, rtol=1e-4, atol=WEIGHT_ATOL,
                                   msg=lambda text, name=name: f"{name}: {text}")
    # Checkpoints hold full tensors in the layout of the plain run's (so either resumes the other).
    for group in ("model", "optimizer"):
        got, want = ours["saved"][SAVE_AT]["tensors"][group], single["saved"][SAVE_AT]["tensors"][group]
        assert got.keys() == want.keys()
        for key in want:
            # atol as for the weights above: after 3 Adam steps 4 of 4,096 elements moved 2.4e-6 on one CPU type.
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=WEIGHT_ATOL,
                                       msg=lambda text, key=key: f"{key}: {text}")


@pytest.mark.slow  # the same two processes (make test-slow)
def test_zero3_checkpoint_resumes_under_ddp_on_one_worker(partitioned, tmp_path):
    """The 2-worker ZeRO-3 run's step-3 checkpoint, resumed by one plain worker, ends where the run did."""
    ours = partitioned[3]
    written = ours["saved"][SAVE_AT]
    path = ckpt.save(tmp_path / "ckpt", "pretrain-3", written["tensors"], {"loop": written["state"]}, keep=1)
    assert path is not None
    resumed = _run("ddp", 0, 1, resume=ckpt.load_latest(path.parent))
    assert resumed["history"][-1]["loss"] == pytest.approx(ours["history"][-1]["loss"], rel=1e-5)
    for name, weight in ours["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # the same two processes (make test-slow)
@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_resumes_into_zero_and_ends_where_the_run_did(stage, partitioned, single):
    """A full-tensor checkpoint (the other stage's, in a ddp run's layout) loaded into ZeRO's partitions: the
    weights, fp32 masters, AdamW moments and step go on as the uninterrupted one-worker run did."""
    resumed = partitioned[f"resumed_into_{stage}"]
    assert [r["step"] for r in resumed["history"]][-(STEPS - SAVE_AT):] == list(range(SAVE_AT + 1, STEPS + 1))
    for got, want in zip(resumed["history"][-(STEPS - SAVE_AT):], single["history"][SAVE_AT:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got
    for name, weight in single["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- the train stage on Ray


# A local Ray and two Ray Train workers under ZeRO-3: minutes on a busy 2-core machine.
@pytest.mark.slow
def test_ray_zero3_run_saves_a_plain_transformers_model(tokenized_workspace, ray_session):
    """Pretraining then full fine-tuning on 2 Ray Train workers under ZeRO-3: the summary names the strategy, each
    worker held half the parameters, and the saved model is a plain transformers directory that generates."""
    from transformers import AutoModelForCausalLM

    from lmforge.stages.train import train

    model_cfg = MODEL.model_copy(update={"vocab_size": 384, "max_seq_len": 64})
    ws = tokenized_workspace("zero3", model_cfg)
    base = _training("deepspeed").model_copy(update={
        "method": "full", "checkpointing": CheckpointingConfig(every=0, every_minutes=0),
        "pretrain": PHASE.model_copy(update={"steps": 4, "seq_len": 32, "grad_accum": 1}),
        "finetune": PHASE.model_copy(update={"steps": 2, "seq_len": 64, "grad_accum": 1}),
        "placement": PlacementConfig(use_ray=True, num_workers=WORLD, cpus_per_worker=0.5)})
    result = train(base, model_cfg, ws, run_name="zero3")
    assert (result.params["strategy"], result.params["world_size"]) == ("deepspeed", WORLD)
    assert result.params["param_bytes_per_worker_pretrain"] == pytest.approx(
        result.params["params_total"] * 4 / WORLD, rel=0.05)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
