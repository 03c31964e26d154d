"""``training.parallel.pipeline_parallel``: stages through ``torch.distributed.pipelining`` in the one training loop, on gloo.

Two real processes (torch.multiprocessing, a gloo process group on loopback, no Ray), one pipeline, run
:func:`lmforge.train.loop.train_phase` on a tiny Llama of 4 blocks (tied embeddings: the first and the last
stage each hold a copy), both reading the whole global batch, as the worker's batch stream does for a
pipeline's ranks; this process runs the same steps on one uncut worker. Losses, validation, final weights and
checkpoints must agree (the schedule changes where the blocks run, never what the step computes); a
checkpoint of either resumes in the other, and the gathered stages load as a plain transformers model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from gloo import spawn_gloo

from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig
from lmforge.model.build import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train import parallel, pipeline
from lmforge.train.loop import train_phase

VOCAB, WORLD, STEPS, SAVE_AT, ROWS, SEQ = 256, 2, 5, 3, 8, 32
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    max_seq_len=SEQ)
SCHEDULES = ("1f1b", "interleaved_1f1b")
# Micro-batches sum a step's gradient in another order: AdamW's first steps (lr 1e-2) turn that float noise on a
# near-zero gradient into up to ~2e-5 on a rare element (measured); the losses still agree to 1e-5.
ATOL = 5e-5


def _training(settings: dict, workers: int = WORLD) -> TrainingConfig:
    return TrainingConfig.model_validate({
        "method": "pretrain", "parallel": settings, "cpu_threads": 1,
        "placement": {"use_ray": True, "num_workers": workers}, "logging": {"every": 1},
        "pretrain": {"steps": STEPS, "learning_rate": 1e-2, "batch_size": ROWS, "seq_len": SEQ, "warmup_steps": 2},
        "validation": {"batches": 1}, "checkpointing": {"every": SAVE_AT, "every_minutes": 0}})


def _run(settings: dict, rank: int, workers: int = WORLD, resume: ckpt.Checkpoint | None = None) -> dict:
    """train_phase on this rank (a pipeline's ranks read one batch stream); its history, checkpoints, parameter
    bytes and the gathered full model."""
    training = _training(settings, workers)
    torch.manual_seed(0)
    model = build_model(MODEL, VOCAB)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (ROWS, SEQ), generator=g) for _ in range(STEPS + 1)]
    steps = [{"input_ids": batch, "labels": batch.clone()} for batch in ids]
    saved: dict[int, dict] = {}

    def save(step: int, tensors: dict, state: dict) -> None:
        saved[step] = {"tensors": tensors, "state": copy.deepcopy(state)}  # the loop's lists grow on after it

    done = resume.state["loop"]["step"] if resume else 0
    history, metrics = train_phase(model, "pretrain", training.pretrain, training, iter(steps[done:STEPS]),
                                   steps[STEPS:], torch.device("cpu"), save=save, resume=resume)
    split = pipeline.degree(training) > 1
    weights = pipeline.full_model_state(model, training) if split else parallel.full_state(model.state_dict())
    return {"history": history, "metrics": metrics, "saved": saved, "bytes": parallel.local_parameter_bytes(model),
            "weights": weights if rank == 0 else {}}


def _written(result: dict, root: Path) -> ckpt.Checkpoint:
    """The run's step-3 checkpoint through the files a real one is (safetensors + JSON), as a resumed run reads it."""
    written = result["saved"][SAVE_AT]
    ckpt.save(root, f"pretrain-{SAVE_AT}", written["tensors"], {"loop": written["state"]}, keep=1)
    loaded = ckpt.load_latest(root)
    assert loaded is not None
    return loaded


def _pipeline_runs(rank: int, world: int, single_root: Path) -> dict:
    results = {kind: _run({"pipeline_parallel": world, "pipeline_schedule": kind}, rank) for kind in SCHEDULES}
    # The one-worker run's checkpoint (written by the parent) resumed by the pipeline.
    results["resumed_from_single"] = _run({"pipeline_parallel": world}, rank, resume=ckpt.load_latest(single_root))
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return _run({}, 0, workers=1)


@pytest.fixture(scope="module")
def piped(tmp_path_factory, single) -> dict:
    """Rank 0's results of the 2-process pipeline runs, by schedule (one spawn: the processes' start is the cost)."""
    tmp = tmp_path_factory.mktemp("pp")
    _written(single, tmp / "single")
    return spawn_gloo(_pipeline_runs, WORLD, tmp / "results.pt", tmp / "single",
                      label=f"pipeline parallel, {' and '.join(SCHEDULES)}")


@pytest.mark.slow  # two gloo processes: tens of seconds on a busy 2-core machine (make test-slow)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_matches_one_worker_and_holds_its_stages(schedule, piped, single):
    got = piped[schedule]
    assert [r["step"] for r in got["history"]] == list(range(1, STEPS + 1))
    for pp_row, one_row in zip(got["history"], single["history"], strict=True):
        assert pp_row["loss"] == pytest.approx(one_row["loss"], rel=1e-5), pp_row
    for key in ("pretrain_val_loss", "pretrain_val_loss_start"):
        assert got["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key
    # Rank 0 holds the embeddings and the first half of the blocks, not the rest.
    assert got["bytes"] < single["bytes"] * 0.8
    assert got["weights"].keys() == single["weights"].keys()
    for key, weight in single["weights"].items():
        torch.testing.assert_close(got["weights"][key], weight, rtol=1e-4, atol=ATOL, msg=key)
    # Checkpoints hold full tensors under the full model's names and optimizer indices.
    for group in ("model", "optimizer"):
        mine, want = got["saved"][SAVE_AT]["tensors"][group], single["saved"][SAVE_AT]["tensors"][group]
        assert mine.keys() == want.keys(), group
        for key in want:
            torch.testing.assert_close(mine[key], want[key], rtol=1e-4, atol=ATOL, msg=key)


@pytest.mark.slow  # two gloo processes (make test-slow)
def test_checkpoints_resume_across_worker_counts(piped, single, tmp_path):
    """A pipeline's checkpoint resumed by one uncut worker, and the reverse, end where the runs did."""
    run = piped["1f1b"]
    resumed = _run({}, 0, workers=1, resume=_written(run, tmp_path))
    for got in (resumed, piped["resumed_from_single"]):
        assert [r["step"] for r in got["history"]] == list(range(1, STEPS + 1))  # the history before it comes back
        assert got["history"][-1]["loss"] == pytest.approx(single["history"][-1]["loss"], rel=1e-5)
        for key, weight in single["weights"].items():
            torch.testing.assert_close(got["weights"][key], weight, rtol=1e-4, atol=ATOL, msg=key)


@pytest.mark.slow  # two gloo processes (make test-slow)
def test_the_gathered_stages_load_as_a_transformers_model(piped, single, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(MODEL, VOCAB)
    model.load_state_dict(piped["1f1b"]["weights"])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(16)[None]
    want = build_model(MODEL, VOCAB)
    want.load_state_dict(single["weights"])
    torch.testing.assert_close(loaded(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)
