"""``training.parallel.tensor_parallel`` (and ``sequence_parallel``): DTensor plans in the one training loop, on gloo.

Two real processes (torch.multiprocessing, a gloo process group on loopback, no Ray), one tensor-parallel
group, run :func:`lmforge.train.loop.train_phase` on a tiny Llama (4 heads, 2 key/value heads: one
key/value head per worker), both feeding the whole global batch, as the worker's batch stream does for
a group's ranks; this process runs the same steps on one unsplit worker. Losses, final weights and
checkpoints must agree: the plan changes where the matrices live, never what the step computes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port
from gloo import WEIGHT_ATOL, gloo_group, spawn_gloo

from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig
from lmforge.model.build import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train import parallel, tensor_parallel
from lmforge.train.loop import train_phase

VOCAB, WORLD, STEPS, SAVE_AT, ROWS, SEQ = 256, 2, 5, 3, 8, 32
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    max_seq_len=SEQ)
SETTINGS = {"tp": {"tensor_parallel": WORLD}, "tp_sp": {"tensor_parallel": WORLD, "sequence_parallel": True}}


def _training(parallel_settings: dict, workers: int = WORLD) -> TrainingConfig:
    return TrainingConfig.model_validate({
        "method": "pretrain", "parallel": parallel_settings, "cpu_threads": 1,
        "placement": {"use_ray": True, "num_workers": workers}, "logging": {"every": 1},
        "pretrain": {"steps": STEPS, "learning_rate": 1e-2, "batch_size": ROWS, "seq_len": SEQ, "warmup_steps": 2},
        "validation": {"batches": 1}, "checkpointing": {"every": SAVE_AT, "every_minutes": 0}})


def _run(parallel_settings: dict, rank: int, workers: int = WORLD, resume: ckpt.Checkpoint | None = None) -> dict:
    """train_phase on this rank over its data-parallel share of each global batch (a tensor-parallel group's
    ranks share one); its history, checkpoint, bytes and gathered weights."""
    training = _training(parallel_settings, workers)
    torch.manual_seed(0)
    model = build_model(MODEL, VOCAB)
    g = torch.Generator().manual_seed(1)
    share, shares = tensor_parallel.data_rank(training)
    rows = ROWS // shares
    batches = [torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)[share * rows:(share + 1) * rows]
               for _ in range(STEPS + 1)]
    steps = [{"input_ids": ids, "labels": ids.clone()} for ids in batches]
    saved: dict[int, dict] = {}

    def save(step: int, tensors: dict, state: dict) -> None:
        # The loop's lists grow on after it; a sharded checkpoint's shards (fsdp: DTensors) gathered (collective).
        saved[step] = {"tensors": {stem: parallel.full_state(group) for stem, group in tensors.items()},
                       "state": copy.deepcopy(state)}

    done = resume.state["loop"]["step"] if resume else 0
    history, metrics = train_phase(model, "pretrain", training.pretrain, training, iter(steps[done:STEPS]),
                                   steps[STEPS:], torch.device("cpu"), save=save, resume=resume)
    split = {name: (p.to_local() if hasattr(p, "to_local") else p).nbytes
             for name, p in model.named_parameters() if name.endswith("_proj.weight")}
    return {"history": history, "metrics": metrics, "saved": saved, "proj_bytes": sum(split.values()),
            "bytes": parallel.local_parameter_bytes(model), "data_rank": (share, shares),
            "weights": parallel.full_state(model.state_dict(), keep=rank == 0)}


def _split_runs(rank: int, workers: int, settings: dict, tmp: Path) -> dict:
    results = {name: _run(one, rank, workers) for name, one in settings.items()}
    if "tp_sp" in settings:  # its step-3 checkpoint (full tensors, as files), resumed by the same split group
        root = tmp / "ckpt"
        if rank == 0:
            written = results["tp_sp"]["saved"][SAVE_AT]
            ckpt.save(root, f"pretrain-{SAVE_AT}", written["tensors"], {"loop": written["state"]}, keep=1)
        dist.barrier()
        results["tp_sp_resumed"] = _run(settings["tp_sp"], rank, workers, resume=ckpt.load_latest(root))
    return results


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict:
    """Rank 0's results of the 2-process tensor-parallel runs, by setting (one spawn: the start is the cost)."""
    tmp = tmp_path_factory.mktemp("tp")
    return spawn_gloo(_split_runs, WORLD, tmp / "results.pt", SETTINGS, tmp,
                      label=f"tensor parallel, {' and '.join(SETTINGS)}")


@pytest.fixture(scope="module")
def single() -> dict:
    return _run({}, 0)


@pytest.mark.slow  # two (or more) gloo processes: tens of seconds on a busy 2-core machine (make test-slow)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_tensor_parallel_matches_one_worker_and_splits_the_blocks(name, split, single):
    got = split[name]
    assert got["data_rank"] == (0, 1)  # one tensor-parallel group: both workers read the whole batch
    assert [r["step"] for r in got["history"]] == list(range(1, STEPS + 1))
    for tp_row, one_row in zip(got["history"], single["history"], strict=True):
        assert tp_row["loss"] == pytest.approx(one_row["loss"], rel=1e-5), tp_row
        assert tp_row["tokens_per_s"] > 0
    assert got["metrics"]["pretrain_val_loss"] == pytest.approx(single["metrics"]["pretrain_val_loss"], rel=1e-5)
    # The blocks' projections are split in two; embeddings and norms stay whole on each worker.
    assert got["proj_bytes"] == single["proj_bytes"] // WORLD
    assert got["bytes"] == single["bytes"] - single["proj_bytes"] // WORLD
    assert got["weights"].keys() == single["weights"].keys()
    for key, weight in single["weights"].items():
        torch.testing.assert_close(got["weights"][key], weight, rtol=1e-4, atol=WEIGHT_ATOL, msg=key)
    # Checkpoints hold full tensors in the unsplit layout, so any strategy or worker count resumes them.
    for group in ("model", "optimizer"):
        mine, want = got["saved"][SAVE_AT]["tensors"][group], single["saved"][SAVE_AT]["tensors"][group]
        assert mine.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(mine[key], want[key], rtol=1e-4, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.slow  # two (or more) gloo processes: tens of seconds on a busy 2-core machine (make test-slow)
def test_a_full_checkpoint_resumes_into_the_split_model(split):
    """The step-3 checkpoint's full tensors, cut into each worker's columns and rows on load, end where the run did."""
    resumed, run = split["tp_sp_resumed"], split["tp_sp"]
    assert [r["step"] for r in resumed["history"]] == list(range(1, STEPS + 1))  # the history before it comes back
    assert resumed["history"][-1]["loss"] == pytest.approx(run["history"][-1]["loss"], rel=1e-5)
    for key, weight in run["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], weight, rtol=1e-4, atol=WEIGHT_ATOL, msg=key)


def test_a_group_that_does_not_split_fails_at_the_workers_start():
    """Config time checks placement.num_workers; a worker checks the group that exists (here one process)."""
    from lmforge.core.errors import ConfigError

    with gloo_group(0, 1, free_port()):
        for strategy, needle in (("ddp", "set placement.num_workers: 2"), ("fsdp", "a multiple of 2")):
            with pytest.raises(ConfigError, match=needle) as caught:
                tensor_parallel.check_group(_training({"strategy": strategy, "tensor_parallel": WORLD}))
            assert "1 workers (placement.num_workers)" in caught.value.cause


# Four processes on a busy 2-core machine: about half a minute more than the test above.
@pytest.mark.slow
def test_fsdp_over_tensor_parallel_groups_on_a_2d_mesh_matches_one_worker(single, tmp_path):
    """4 workers, a 2 x 2 mesh: FSDP2 shards over 2 tensor-parallel groups, each reading half of every batch."""
    settings = {"fsdp_tp_sp": {"strategy": "fsdp", "tensor_parallel": 2, "sequence_parallel": True}}
    got = spawn_gloo(_split_runs, 4, tmp_path / "results.pt", settings, tmp_path, label="fsdp over tp")["fsdp_tp_sp"]
    assert got["data_rank"] == (0, 2)
    for row, one_row in zip(got["history"], single["history"], strict=True):
        assert row["loss"] == pytest.approx(one_row["loss"], rel=1e-5), row
    # Split in two by the plan, then in two again by FSDP2: a quarter of every projection, half of the rest.
    assert got["proj_bytes"] == pytest.approx(single["proj_bytes"] / 4, rel=0.02)
    assert got["bytes"] == pytest.approx(single["proj_bytes"] / 4 + (single["bytes"] - single["proj_bytes"]) / 2,
                                         rel=0.02)
    for key, weight in single["weights"].items():
        torch.testing.assert_close(got["weights"][key], weight, rtol=1e-4, atol=WEIGHT_ATOL, msg=key)


# ---------------------------------------------------------------- the train stage on Ray


# A local Ray with two Ray Train workers, then one: a minute or more on a busy 2-core machine.
@pytest.mark.slow
def test_ray_tensor_parallel_run_saves_the_model_one_worker_saves(tokenized_workspace, ray_session):
    """Pretraining then full fine-tuning, split over 2 Ray Train workers (sequence parallel): the worker's batch
    stream gives both the whole batch, and the saved model is the plain transformers model one worker saves."""
    from transformers import AutoModelForCausalLM

    from lmforge.stages.train import train

    model_cfg = MODEL.model_copy(update={"vocab_size": 384, "max_seq_len": 64})
    ws = tokenized_workspace("tp", model_cfg)
    phase = {"steps": 4, "learning_rate": 3e-3, "batch_size": 4, "warmup_steps": 2}
    base = TrainingConfig.model_validate({
        "method": "full", "cpu_threads": 1, "logging": {"every": 1}, "validation": {"batches": 1},
        "pretrain": {**phase, "seq_len": 32}, "finetune": {**phase, "seq_len": 64},
        "parallel": {"tensor_parallel": WORLD, "sequence_parallel": True},
        "placement": {"use_ray": True, "num_workers": WORLD, "cpus_per_worker": 0.5}})
    split_run = train(base, model_cfg, ws, run_name="tp")
    assert split_run.params["mesh"] == {"data_parallel_shard": 1, "tensor_parallel": WORLD, "pipeline_parallel": 1}
    one = train(base.model_copy(update={"parallel": base.parallel.model_copy(update={
        "tensor_parallel": 1, "sequence_parallel": False}), "placement": base.placement.model_copy(update={
            "num_workers": 1})}), model_cfg, ws, run_name="one")
    assert split_run.params["param_bytes_per_worker_finetune"] < one.params["param_bytes_per_worker_finetune"]
    for tp_row, one_row in zip(split_run.history, one.history, strict=True):
        assert tp_row["loss"] == pytest.approx(one_row["loss"], rel=1e-4), tp_row
    tp_model, one_model = (AutoModelForCausalLM.from_pretrained(r.model_dir) for r in (split_run, one))
    one_weights = one_model.state_dict()
    # The row-wise products sum in another order, and AdamW's first steps (a gradient over its own magnitude) magnify
    # the last bits of weights whose gradients are nearly zero: equal as tensors (1e-3 of their norm), not per element.
    for key, weight in tp_model.state_dict().items():
        assert float((weight - one_weights[key]).norm()) <= 1e-3 * float(one_weights[key].norm()), key
    assert split_run.metrics["finetune_val_loss"] == pytest.approx(one.metrics["finetune_val_loss"], rel=1e-4)
