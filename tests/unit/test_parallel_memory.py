"""Per-worker memory by strategy (``lmforge model info``): ddp is the one-replica estimate, fsdp divides the model
states by the workers, tensor parallelism the blocks' states and activations; the advice names the least that fits."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.config.model import ModelConfig
from lmforge.config.training import PhaseConfig, TrainingConfig
from lmforge.model.info import describe
from lmforge.model.memory import PhaseMemory, Shape, layer_activations
from lmforge.model.parallel_memory import GB, Layout, Zero, advice, least_that_fits, per_worker, strategy_table

LLAMA_7B = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                       num_kv_heads=32, intermediate_size=11008, max_seq_len=4096, tie_embeddings=False)
PHASE = PhaseConfig(steps=10, learning_rate=1e-5, batch_size=1, seq_len=2048)
SHAPE = Shape(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256)
ONE = PhaseMemory(phase="finetune", method="full", batch_tokens=1024, weights=4000, gradients=4000, optimizer=8000,
                  activations=int(layer_activations(SHAPE, 1024, False)) + 5000)


def _layout(on_gpu: bool = False) -> Layout:
    return Layout(SHAPE, block_fraction=0.75, checkpointing=False, fused_loss=False, on_gpu=on_gpu)


def test_ddp_is_one_replica_and_fsdp_divides_the_model_states():
    assert per_worker(ONE, _layout(), "ddp").total == ONE.total
    fsdp = per_worker(ONE, _layout(), "fsdp", workers=4)
    assert (fsdp.gradients, fsdp.optimizer) == (1000, 2000)
    # A quarter of the weights, plus two blocks gathered at once (4000 * 0.75 / 4 layers each, in float32 on a CPU).
    assert fsdp.weights == 1000 + 2 * 750
    assert per_worker(ONE, _layout(on_gpu=True), "fsdp", workers=4).weights == 1000 + 750  # bf16 gathers
    assert fsdp.activations == ONE.activations


def test_tensor_parallel_divides_the_blocks_and_their_activations():
    tp = per_worker(ONE, _layout(), "fsdp", workers=4, tensor_parallel=2)
    # Blocks' states over 2 x 2 workers, the rest over the 2 data-parallel groups.
    assert tp.gradients == int(4000 * (0.75 / 4 + 0.25 / 2))
    assert tp.optimizer == int(8000 * (0.75 / 4 + 0.25 / 2))
    # Per layer and token: the heads' and MLP columns' tensors halve; norms and residual stay whole without
    # sequence parallelism; the logits (no fused loss: 10 bytes per vocabulary entry and token) stay whole.
    h, kv, inter, logits = 64, 32, 128, 1024 * 256 * 10
    split, whole = 2 * (3 * h + 2 * kv + 4 * inter), 2 * 3 * h + 8 * h
    assert tp.activations == int(1024 * 4 * (split / 2 + whole)) + logits
    sp = per_worker(ONE, _layout(), "fsdp", workers=4, tensor_parallel=2, sequence_parallel=True)
    assert sp.activations == int(1024 * 4 * (split / 2 + whole / 2)) + logits


def test_advice_names_the_least_that_fits():
    assert least_that_fits(ONE, _layout(), ONE.total, (2,)).strategy == "ddp"
    fit = least_that_fits(ONE, _layout(), ONE.total - 6500, (2,))  # half the states (8000) less two blocks (1500)
    assert (fit.strategy, fit.workers, fit.tensor_parallel) == ("fsdp", 2, 1)
    # Activations no fsdp count can divide: tensor parallelism (with sequence parallelism) is the way left.
    tight = per_worker(ONE, _layout(), "fsdp", 1024).total - 1
    fit = least_that_fits(ONE, _layout(), tight, (2,))
    assert fit.tensor_parallel == 2
    assert "does not fit" in advice(ONE, _layout(), ("GPU", 1000), (2,))


def test_full_fine_tuning_of_a_7b_llama_needs_fsdp_on_80_gb():
    training = TrainingConfig(method="full", finetune=PHASE, placement={"use_gpu": True, "num_workers": 4})
    info = describe(LLAMA_7B, training, 32000)
    ddp, fsdp, zero2, zero3, tp = [s for s in info.strategies if s.phase == "finetune"]
    params = info.params_total  # 6.7 billion: 16 bytes each as one replica (weights, gradients, AdamW states)
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * params
    assert (fsdp.workers, tp.workers, tp.tensor_parallel) == (4, 4, 2)
    assert fsdp.gradients == pytest.approx(4 * params / 4, rel=1e-6)
    assert tp.total < fsdp.total < ddp.total
    assert zero3.total == fsdp.total and fsdp.total < zero2.total < ddp.total  # ZeRO-2 keeps the whole weights
    sentence = info.advice[-1]
    # 16 x 6.7e9 / N + activations + two bf16 blocks fit 80 GB from N = 2.
    assert sentence.startswith("full fine-tuning of this model needs fsdp with >= 2 workers of 80 GB"), sentence


def test_model_info_prints_the_strategies_and_the_advice(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  method: full\n")
    main(["model", "info", str(config)])
    out = capsys.readouterr().out
    assert "per worker, ddp" in out and "per worker, fsdp, 2 workers" in out
    assert "per worker, deepspeed ZeRO-2, 2 workers" in out and "per worker, deepspeed ZeRO-3, 2 workers" in out
    assert "tensor_parallel 2" in out and "full fine-tuning of this model fits one 80 GB GPU per worker" in out
    main(["model", "info", str(config), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {row["strategy"] for row in report["strategies"]} == {"ddp", "fsdp", "deepspeed"}
    assert {row["zero_stage"] for row in report["strategies"] if row["strategy"] == "deepspeed"} == {2, 3}
    assert all(row["total"] > 0 for row in report["strategies"]) and report["advice"]
    assert report["strategies"][0]["total"] < 1 * GB


def test_one_tensor_parallel_group_splits_only_the_blocks():
    alone = per_worker(ONE, _layout(), "ddp", workers=2, tensor_parallel=2)
    assert alone.label == "ddp, tensor_parallel 2"
    assert alone.gradients == int(4000 * (0.75 / 2 + 0.25))
    assert alone.weights == int(4000 * (0.75 / 2 + 0.25))  # nothing gathered: FSDP2 shards nothing here


def test_the_configured_strategy_is_what_the_fit_check_reads():
    phase = {"finetune": PHASE, "method": "full"}
    replicas = describe(LLAMA_7B, TrainingConfig(**phase, placement={"num_workers": 8}), 32000)
    sharded = describe(LLAMA_7B, TrainingConfig(**phase, placement={"num_workers": 8},
                                                 parallel={"strategy": "fsdp", "tensor_parallel": 2}), 32000)
    (one,), (split,) = ([c for c in i.configured if c.phase == "finetune"] for i in (replicas, sharded))
    assert (one.label, split.label) == ("ddp", "fsdp, 8 workers, tensor_parallel 2")
    assert one.total == next(m for m in replicas.memory if m.phase == "finetune").total
    assert split.optimizer < one.optimizer / 7


def test_the_preflight_check_reads_one_workers_share():
    from lmforge.config.pipeline import PipelineConfig
    from lmforge.core.errors import ConfigError
    from lmforge.model.preflight import preflight

    big = LLAMA_7B.model_copy(update={"hidden_size": 8192, "num_layers": 80, "num_heads": 64, "num_kv_heads": 8,
                                      "intermediate_size": 28672})
    training = {"method": "full", "finetune": PHASE.model_dump(), "pretrain": {"steps": 0},
                "speed": {"gradient_checkpointing": True}, "placement": {"use_gpu": True, "num_workers": 64}}
    replicas = PipelineConfig.model_validate({"model": big.model_dump(), "training": training})
    with pytest.raises(ConfigError, match="shard it over more GPU workers"):
        preflight(replicas, budget=("GPU", 80 * GB))
    sharded = replicas.model_copy(update={"training": replicas.training.model_copy(update={
        "parallel": replicas.training.parallel.model_copy(update={"strategy": "fsdp"})})})
    result = preflight(sharded, budget=("GPU", 80 * GB))
    assert result is not None and result.train_bytes < 80 * GB  # 70B's 16 bytes a parameter over 64 workers


def test_pipeline_parallel_divides_the_blocks_states_over_its_stages():
    pp = per_worker(ONE, _layout(), "ddp", workers=2, pipeline_parallel=2)
    # 0.75 of each state is in the blocks (half of it on each stage); the embeddings or output layer stay whole.
    assert (pp.weights, pp.gradients, pp.optimizer) == (2500, 2500, 5000)
    assert pp.activations == ONE.activations  # an upper bound
    assert pp.label == "ddp, pipeline_parallel 2"


def test_deepspeed_stage_3_divides_like_fsdp_and_stage_2_keeps_the_weights():
    fsdp = per_worker(ONE, _layout(), "fsdp", workers=4)
    zero3 = per_worker(ONE, _layout(), "deepspeed", workers=4, zero=Zero(stage=3))
    assert (zero3.weights, zero3.gradients, zero3.optimizer) == (fsdp.weights, fsdp.gradients, fsdp.optimizer)
    assert zero3.label == "deepspeed ZeRO-3, 4 workers"
    zero2 = per_worker(ONE, _layout(), "deepspeed", workers=4, zero=Zero(stage=2))
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == (4000, 1000, 2000)
    # Offloaded: AdamW's states leave the device; with offload_params (stage 3) the weight shards too.
    offloaded = per_worker(ONE, _layout(), "deepspeed", workers=4, zero=Zero(3, True, True))
    assert (offloaded.optimizer, offloaded.weights) == (0, fsdp.weights - 1000)
    rows = strategy_table(ONE, _layout(), 4, 0, False)
    assert [r.label for r in rows] == ["ddp", "fsdp, 4 workers", "deepspeed ZeRO-2, 4 workers",
                                       "deepspeed ZeRO-3, 4 workers"]


def test_the_configured_deepspeed_run_is_what_the_fit_check_reads():
    from lmforge.model.parallel_memory import configured_memory

    training = TrainingConfig(placement={"use_ray": True, "num_workers": 4},
                              parallel={"strategy": "deepspeed", "deepspeed": {"stage": 2, "offload_optimizer": True}})
    mine = configured_memory(ONE, SHAPE, 10_000, training)
    assert (mine.weights, mine.gradients, mine.optimizer) == (ONE.weights, 1000, 0)
