"""The training engine end to end on tiny models: data, the loop, LoRA, saving, and Ray Train.

Every run here is real (CPU, a 2-layer model of width 32, a few dozen steps); the one Ray run
starts a local Ray with 2 workers of half a CPU each, as the pipeline does on a small machine.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import write_corpus

from lmforge.config.model import ModelConfig
from lmforge.config.training import LoggingConfig, PhaseConfig, PlacementConfig, TrainingConfig, TrainValidationConfig
from lmforge.core.errors import ConfigError, TrainingDiverged
from lmforge.core.workspace import Workspace
from lmforge.data.packing import IGNORE_INDEX, pack_documents
from lmforge.data.sft import read_sft, split_finetune
from lmforge.model.build import build_model, count_parameters
from lmforge.model.prompt import EOS_TOKEN, format_prompt
from lmforge.stages.train import DEFAULT_HELDOUT_FRACTION, train
from lmforge.tokenizer.build import load_tokenizer, train_tokenizer
from lmforge.train.artifacts import greedy_ids, load_probe
from lmforge.train.data import ON_THE_FLY, batch_stream, encode_sft
from lmforge.train.loop import lr_factor

MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=64)
TRAINING = TrainingConfig(
    pretrain=PhaseConfig(steps=30, learning_rate=1e-2, batch_size=8, seq_len=32, warmup_steps=3),
    finetune=PhaseConfig(steps=15, learning_rate=1e-2, batch_size=8, seq_len=64, warmup_steps=2),
    method="lora", placement=PlacementConfig(use_ray=False), logging=LoggingConfig(every=5), cpu_threads=1,
    validation=TrainValidationConfig(batches=2),
)


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    return tokenized_workspace("train", MODEL)


@pytest.fixture(scope="module")
def tokenizer(ws):
    return load_tokenizer(ws.tokenizer_dir)


@pytest.fixture(scope="module")
def lora_run(ws):
    rows = []
    return train(TRAINING, MODEL, ws, run_name="lora", progress=rows.append), rows


# ---------------------------------------------------------------- model and data


@pytest.mark.parametrize("architecture,kv_heads", [("llama", 2), ("gpt2", 4), ("mistral", 2), ("gpt_neox", 4)])
def test_build_model_from_config(architecture, kv_heads):
    cfg = MODEL.model_copy(update={"architecture": architecture, "num_kv_heads": kv_heads})
    model = build_model(cfg, vocab_size=300)
    logits = model(torch.randint(0, 300, (2, 16))).logits
    assert logits.shape == (2, 16, 300)
    assert model.config.model_type == architecture
    # Tied embeddings are counted once.
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if architecture == "llama":
        assert model.config.num_key_value_heads == 2 and model.config.hidden_act == "silu"


def test_gpt2_rejects_grouped_query_attention():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        build_model(MODEL.model_copy(update={"architecture": "gpt2"}), vocab_size=300)
    with pytest.raises(ConfigError, match="num_kv_heads"):  # nor does GPT-NeoX
        build_model(MODEL.model_copy(update={"architecture": "gpt_neox"}), vocab_size=300)
    with pytest.raises(ConfigError, match="unknown architecture 'lama'"):
        build_model(MODEL.model_copy(update={"architecture": "lama"}), vocab_size=300)


def test_vocabulary_padding_and_untied_embeddings():
    model = build_model(MODEL.model_copy(update={"vocab_multiple": 64, "tie_embeddings": False}), vocab_size=300)
    assert model.get_input_embeddings().num_embeddings == 320
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_sft_labels_cover_the_response_only(tokenizer):
    record = {"instruction": "What does `len` do?", "response": "Return the number of items."}
    rows = encode_sft([record], tokenizer, seq_len=48)
    ids, labels, mask = rows["input_ids"][0], rows["labels"][0], rows["attention_mask"][0]
    n_prompt = len(tokenizer(format_prompt(record["instruction"]), add_special_tokens=False)["input_ids"])
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    learned = labels[labels != IGNORE_INDEX]
    assert tokenizer.decode(learned) == record["response"] + EOS_TOKEN
    assert torch.equal(ids[n_prompt:n_prompt + len(learned)], learned)
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()


def test_packing_fills_blocks_with_eos_between_documents(tokenizer):
    texts = ["first document here", "second one", "third and last document"]
    blocks = pack_documents(texts * 4, tokenizer, seq_len=16)["input_ids"]
    assert blocks.shape[1] == 16
    assert (blocks == tokenizer.eos_token_id).sum() >= blocks.numel() // 16  # separators survive
    assert (blocks != tokenizer.pad_token_id).all()  # no padding wasted


def test_batch_stream_shards_disjointly_and_deterministically():
    data = {"input_ids": torch.arange(20).unsqueeze(1)}

    def take(rank: int, seed: int = 1) -> list[list[int]]:
        return [b["input_ids"].flatten().tolist() for b, _ in
                zip(batch_stream(data, 5, seed=seed, rank=rank, world_size=2), range(4))]

    rank0, rank1 = take(0), take(1)
    assert take(0) == rank0 and take(0, seed=2) != rank0
    first_epoch0 = {i for batch in rank0[:2] for i in batch}
    first_epoch1 = {i for batch in rank1[:2] for i in batch}
    assert not first_epoch0 & first_epoch1 and len(first_epoch0 | first_epoch1) == 20
    assert len(rank0) == 4  # keeps going past the end of an epoch


def test_schedule_warms_up_then_decays():
    phase = PhaseConfig(steps=100, learning_rate=1.0, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, phase) == pytest.approx(0.1) and lr_factor(9, phase) == pytest.approx(1.0)
    assert lr_factor(55, phase) < lr_factor(20, phase) and lr_factor(99, phase) >= 0.1
    assert lr_factor(50, phase.model_copy(update={"schedule": "constant"})) == 1.0


# ---------------------------------------------------------------- in-line runs


def test_inline_run_learns_and_saves_a_reloadable_model(ws, lora_run):
    result, progress_rows = lora_run
    pretrain = [r for r in result.history if r["phase"] == "pretrain"]
    assert pretrain[-1]["loss"] < pretrain[0]["loss"] - 0.5
    assert progress_rows == result.history and {"step", "phase", "loss", "lr", "tokens_per_s"} <= set(pretrain[0])
    assert {"pretrain_loss", "pretrain_val_loss", "finetune_loss", "finetune_val_loss"} <= set(result.metrics)
    assert result.params["params_trainable_finetune"] < result.params["params_trainable_pretrain"]
    assert result.params["training.pretrain.steps"] == 30
    # No tokenized datasets here: fine-tuning held out tokenize.finetune_heldout_fraction itself.
    held = split_finetune(read_sft(ws.sft_dir / "train.jsonl"), DEFAULT_HELDOUT_FRACTION)[1]
    assert result.params["data_finetune"] == ON_THE_FLY and len(held) > 1
    assert result.params["data_finetune_validation_rows"] == len(encode_sft(held, load_tokenizer(ws.tokenizer_dir),
                                                                            TRAINING.finetune.seq_len)["input_ids"])
    assert (result.model_dir / "model.safetensors").exists()
    assert not list(result.model_dir.rglob("*.bin")) and not list(result.model_dir.rglob("*.pt"))
    assert ws.read_state("train")["run_id"] == result.run_id
    assert json.loads((result.model_dir.parent / "train_result.json").read_text())["metrics"] == result.metrics

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tok = load_tokenizer(result.model_dir)
    probe = load_probe(result.model_dir)  # greedy tokens recorded before saving
    assert 0 < len(probe["completion_ids"]) <= probe["max_new_tokens"]
    assert greedy_ids(model, tok, probe["prompt"], probe["max_new_tokens"]) == probe["completion_ids"]
    assert tok.chat_template and model.generation_config.eos_token_id == tok.eos_token_id


def test_full_finetune_of_a_saved_base_gpt2(ws, tokenizer, tmp_path):
    gpt2 = MODEL.model_copy(update={"architecture": "gpt2", "num_kv_heads": 4})
    small = TRAINING.model_copy(update={"pretrain": TRAINING.pretrain.model_copy(update={"steps": 4}),
                                        "finetune": TRAINING.finetune.model_copy(update={"steps": 4}),
                                        "method": "full"})
    first = train(small, gpt2, ws, run_name="gpt2")
    assert first.adapter_dir is None and "finetune_val_loss" in first.metrics

    # That model is a pretrained base now: fine-tune it without pretraining.
    based = gpt2.model_copy(update={"base_model": str(first.model_dir)})
    assert len(load_tokenizer(train_tokenizer(based, Workspace(tmp_path)))) == len(tokenizer)
    again = train(small.model_copy(update={"pretrain": small.pretrain.model_copy(update={"steps": 0})}),
                  based, ws, run_name="from-base")
    assert [r["phase"] for r in again.history] == ["finetune"] * len(again.history)
    with pytest.raises(ConfigError, match=rf"{len(tokenizer) + 50}.*{len(tokenizer)}"):
        build_model(based, vocab_size=len(tokenizer) + 50)


def test_divergence_raises_our_error_and_leaves_no_run(ws):
    absurd = TRAINING.model_copy(update={"pretrain": TRAINING.pretrain.model_copy(
        update={"learning_rate": 1e6, "warmup_steps": 0}), "method": "pretrain"})
    def runs() -> set:  # runs/ exists once any run finished: not yet when this test runs first
        return set(ws.runs_dir.iterdir()) if ws.runs_dir.exists() else set()

    before = runs()
    with pytest.raises(TrainingDiverged, match=r"pretrain step \d+") as info:
        train(absurd, MODEL, ws, run_name="nan")
    assert "learning_rate" in info.value.fix
    assert runs() == before  # the atomic run dir was discarded


def test_cli_trains_tokenizer_and_model(tmp_path, capsys):
    from lmforge.train.__main__ import main

    home = Workspace(tmp_path / "home")
    write_corpus(home)
    config = tmp_path / "tiny.yaml"
    small = TRAINING.model_copy(update={"pretrain": TRAINING.pretrain.model_copy(update={"steps": 3}),
                                        "method": "pretrain"})
    config.write_text(json.dumps({"model": MODEL.model_dump(mode="json"),
                                  "training": small.model_dump(mode="json")}))  # JSON is YAML
    assert main([str(config), "--home", str(home.home)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (home.tokenizer_dir / "tokenizer.json").exists()
    assert summary["run_id"] and (home.runs_dir / summary["run_id"] / "model" / "config.json").exists()


# ---------------------------------------------------------------- Ray Train


# Slow on a busy 2-core machine (a local Ray cluster and two workers: 40 s idle, over 3 minutes with
# one core taken); `make test` still trains with Ray DDP on two workers in the README's `make run`.
@pytest.mark.slow
def test_ray_ddp_two_workers_match_one_worker_with_the_same_global_batch(ws, ray_session):
    """2 Ray Train workers (DDP over gloo) of batch 8 = 1 in-line worker of batch 16, step for step."""
    lora = TRAINING.lora.model_copy(update={"dropout": 0.0})  # dropout masks would differ by rank
    config = TRAINING.model_copy(update={
        "placement": PlacementConfig(use_ray=True, num_workers=2, cpus_per_worker=0.5), "lora": lora,
        "pretrain": TRAINING.pretrain.model_copy(update={"steps": 20}),
        "finetune": TRAINING.finetune.model_copy(update={"steps": 6})})
    started = time.perf_counter()
    rows: list[dict] = []  # rank 0's rows reach the driver live (lmforge.train.relay), each once
    result = train(config, MODEL, ws, run_name="ray", progress=rows.append)
    print(f"\nRay TorchTrainer run (2 CPU workers) took {time.perf_counter() - started:.1f} s wall")
    assert result.params["world_size"] == 2
    assert (result.model_dir / "model.safetensors").exists() and (result.adapter_dir / "adapter_config.json").exists()
    assert not (ws.ray_dir / "train" / result.run_id).exists()  # a finished run's Ray checkpoints are removed
    assert rows == result.history

    single = train(config.model_copy(update={
        "placement": PlacementConfig(use_ray=False, num_workers=1),
        "pretrain": config.pretrain.model_copy(update={"batch_size": 16}),
        "finetune": config.finetune.model_copy(update={"batch_size": 16})}), MODEL, ws, run_name="one")
    assert single.params["world_size"] == 1
    assert [(r["phase"], r["step"]) for r in result.history] == [(r["phase"], r["step"]) for r in single.history]
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(result.history, single.history))
    print(f"largest relative loss difference, 2 DDP workers vs 1 worker: {worst:.1e}")
    for ddp_row, one_row in zip(result.history, single.history):
        assert ddp_row["loss"] == pytest.approx(one_row["loss"], rel=1e-5), ddp_row
    for name in ("pretrain_val_loss", "finetune_val_loss"):
        assert result.metrics[name] == pytest.approx(single.metrics[name], rel=1e-5)


@pytest.mark.slow
def test_ray_divergence_reaches_the_driver_as_our_error(ws, ray_session):
    absurd = TRAINING.model_copy(update={"placement": PlacementConfig(use_ray=True, num_workers=2, cpus_per_worker=0.5),
                                         "method": "pretrain", "pretrain": TRAINING.pretrain.model_copy(
                                             update={"learning_rate": 1e6, "warmup_steps": 0})})
    with pytest.raises(TrainingDiverged, match="learning_rate"):
        train(absurd, MODEL, ws, run_name="ray-nan")
