"""``training.parallel.strategy: fsdp``: FSDP2 in the one training loop, on 2 CPU processes over gloo.

Two real processes (torch.multiprocessing, a gloo process group on loopback, no Ray: seconds, not a
minute) run :func:`lmforge.train.loop.train_phase` with the model sharded, on a tiny Llama built from
config and fixed token batches; this process runs the same steps unsharded on one worker with the
global batch. Their losses, final weights and checkpoints must agree: FSDP2 changes where the
weights live, never what the step computes. The whole train stage under Ray is the slow test below.
"""

from __future__ import annotations

import pytest
import torch
from gloo import WEIGHT_ATOL, spawn_gloo

from lmforge.config.model import ModelConfig
from lmforge.config.parallel import ParallelConfig
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
from lmforge.train import parallel
from lmforge.train.loop import train_phase
from lmforge.train.methods.catalog import apply_method

VOCAB, WORLD, STEPS, SAVE_AT = 256, 2, 6, 3
METHODS = ("pretrain", "lora")
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    max_seq_len=32)
PHASE = PhaseConfig(steps=STEPS, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=2)


def _training(method: str, strategy: str) -> TrainingConfig:
    lora = {"dropout": 0.0}  # dropout masks would differ by rank
    return TrainingConfig.model_validate({
        "method": method, "lora": lora, "parallel": ParallelConfig(strategy=strategy).model_dump(),
        "placement": PlacementConfig(use_ray=True, num_workers=WORLD).model_dump(), "cpu_threads": 1,
        "logging": LoggingConfig(every=1).model_dump(), "validation": TrainValidationConfig(batches=1).model_dump(),
        "checkpointing": CheckpointingConfig(every=SAVE_AT, every_minutes=0).model_dump()})


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(MODEL, VOCAB)
    return apply_method(model, _training(method, "ddp")) if method == "lora" else model


def _batches(rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """This rank's share of every step's global batch (8 rows), and of one validation batch."""
    g = torch.Generator().manual_seed(1)
    rows = PHASE.batch_size * WORLD // world

    def share(ids: torch.Tensor) -> dict:
        ids = ids[rank * rows:(rank + 1) * rows]
        return {"input_ids": ids, "labels": ids.clone()}

    steps = [share(torch.randint(0, VOCAB, (PHASE.batch_size * WORLD, PHASE.seq_len), generator=g))
             for _ in range(STEPS)]
    return steps, [share(torch.randint(0, VOCAB, (PHASE.batch_size * WORLD, PHASE.seq_len), generator=g))]


def _run(method: str, strategy: str, rank: int, world: int, resume: ckpt.Checkpoint | None = None) -> dict:
    """train_phase on this rank; returns its history, checkpoints, parameter bytes and gathered weights."""
    training = _training(method, strategy)
    model = _model(method)
    steps, val = _batches(rank, world)
    saved: dict[int, dict] = {}

    def save(step: int, tensors: dict, state: dict) -> None:
        # A sharded checkpoint's shards (DTensors) gathered here (collective), to hand them to the test process.
        saved[step] = {"tensors": {stem: parallel.full_state(group) for stem, group in tensors.items()}, "state": state}

    done = resume.state["loop"]["step"] if resume else 0
    phase = PHASE.model_copy(update={"batch_size": PHASE.batch_size * WORLD // world})
    history, metrics = train_phase(model, "pretrain", phase, training, iter(steps[done:]), val, torch.device("cpu"),
                                   save=save, resume=resume)
    return {"history": history, "metrics": metrics, "saved": saved, "bytes": parallel.local_parameter_bytes(model),
            "weights": parallel.full_state(model.state_dict(), keep=rank == 0)}


def _sharded_runs(rank: int, world: int) -> dict:
    return {method: _run(method, "fsdp", rank, world) for method in METHODS}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    """Rank 0's results of the 2-process sharded runs, by method (one spawn: the processes' start is the cost)."""
    out = tmp_path_factory.mktemp("fsdp") / "results.pt"
    return spawn_gloo(_sharded_runs, WORLD, out, label=f"fsdp, {' and '.join(METHODS)}")


@pytest.mark.slow  # two (or more) gloo processes: tens of seconds on a busy 2-core machine (make test-slow)
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_two_workers_match_one_worker_and_hold_half_the_parameters(method, sharded):
    sharded = sharded[method]
    single = _run(method, "ddp", 0, 1)
    assert [r["step"] for r in sharded["history"]] == list(range(1, STEPS + 1))
    for fsdp_row, one_row in zip(sharded["history"], single["history"], strict=True):
        assert fsdp_row["loss"] == pytest.approx(one_row["loss"], rel=1e-5), fsdp_row
    assert sharded["metrics"]["pretrain_val_loss"] == pytest.approx(single["metrics"]["pretrain_val_loss"], rel=1e-5)
    # Every weight is sharded in two (the rows of each matrix and vector), rank 0 holding the larger half.
    assert sharded["bytes"] == pytest.approx(single["bytes"] / WORLD, rel=0.02)
    assert sharded["weights"].keys() == single["weights"].keys()
    for name, weight in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-4, atol=WEIGHT_ATOL,
                                   msg=lambda text, name=name: f"{name}: {text}")
    # The sharded checkpoint's weights (each rank's shards, gathered here) are the unsharded run's full checkpoint's.
    got, want = sharded["saved"][SAVE_AT]["tensors"][ckpt.SHARDS], single["saved"][SAVE_AT]["tensors"]["model"]
    assert {key for key in got if key.startswith("model.")} == {f"model.{key}" for key in want}
    for key in want:
        torch.testing.assert_close(got[f"model.{key}"], want[key], rtol=1e-4, atol=WEIGHT_ATOL,
                                   msg=lambda text, key=key: f"{key}: {text}")


@pytest.mark.slow  # two (or more) gloo processes: tens of seconds on a busy 2-core machine (make test-slow)
def test_fsdp_checkpoint_resumes_on_another_number_of_workers(sharded, tmp_path):
    """The 2-worker sharded run's step-3 checkpoint, resumed by one unsharded worker, ends where the run did
    (its shards gathered and written as one worker's sharded checkpoint; test_train_sharded_checkpoint.py
    resumes the 2 workers' own files)."""
    sharded = sharded["pretrain"]
    written = sharded["saved"][SAVE_AT]
    # Through the files a real checkpoint is (safetensors + JSON), as a resumed run reads them.
    path = ckpt.save(tmp_path / "ckpt", "pretrain-3", written["tensors"], {"loop": written["state"]}, keep=1)
    resumed = _run("pretrain", "ddp", 0, 1, resume=ckpt.load_latest(path.parent))
    assert resumed["history"][-1]["loss"] == pytest.approx(sharded["history"][-1]["loss"], rel=1e-5)
    for name, weight in sharded["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=1e-4, atol=WEIGHT_ATOL,
                                   msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("settings,needle", [
    ({"parallel": {"strategy": "deepspeed"}, "placement": {"use_ray": False}}, "use_ray"),
    ({"parallel": {"strategy": "fsdp"}, "placement": {"use_ray": False}}, "use_ray"),
    ({"parallel": {"strategy": "fsdp"}, "method": "qlora"}, "4-bit"),
    ({"parallel": {"strategy": "fsdp"}, "speed": {"compile": True, "compile_scope": "model"}}, "compile_scope"),
    ({"parallel": {"strategy": "fsdp", "fsdp": {"offload": True}}}, "offload"),
])
def test_bad_parallel_settings_fail_at_config_time(settings, needle):
    with pytest.raises(ValueError, match=needle):
        TrainingConfig.model_validate(settings)


# ---------------------------------------------------------------- the train stage on Ray


# A local Ray and two Ray Train workers, twice (fsdp, then ddp): minutes on a busy 2-core machine.
@pytest.mark.slow
def test_ray_fsdp_run_saves_the_model_a_ddp_run_saves(tokenized_workspace, ray_session):
    """Pretraining then LoRA on 2 Ray Train workers: fsdp and ddp save the same plain transformers model."""
    from transformers import AutoModelForCausalLM

    from lmforge.stages.train import train

    model_cfg = MODEL.model_copy(update={"vocab_size": 384, "max_seq_len": 64})
    ws = tokenized_workspace("fsdp", model_cfg)
    base = _training("lora", "fsdp").model_copy(update={
        "pretrain": PHASE.model_copy(update={"steps": 8, "seq_len": 32}),
        "finetune": PHASE.model_copy(update={"steps": 4, "seq_len": 64}),
        "placement": PlacementConfig(use_ray=True, num_workers=WORLD, cpus_per_worker=0.5)})
    sharded = train(base, model_cfg, ws, run_name="fsdp")
    assert (sharded.params["strategy"], sharded.params["world_size"]) == ("fsdp", WORLD)
    replicated = train(base.model_copy(update={"parallel": ParallelConfig()}), model_cfg, ws, run_name="ddp")
    assert replicated.params["strategy"] == "ddp"
    for phase in ("pretrain", "finetune"):
        ratio = sharded.params[f"param_bytes_per_worker_{phase}"] / replicated.params[f"param_bytes_per_worker_{phase}"]
        assert ratio == pytest.approx(1 / WORLD, rel=0.05), phase
    for fsdp_row, ddp_row in zip(sharded.history, replicated.history, strict=True):
        assert fsdp_row["loss"] == pytest.approx(ddp_row["loss"], rel=1e-4), fsdp_row
    fsdp_model, ddp_model = (AutoModelForCausalLM.from_pretrained(r.model_dir) for r in (sharded, replicated))
    ddp_weights = ddp_model.state_dict()
    for name, weight in fsdp_model.state_dict().items():
        torch.testing.assert_close(weight, ddp_weights[name], rtol=1e-4, atol=WEIGHT_ATOL,
                                   msg=lambda text, name=name: f"{name}: {text}")
