"""Tokenize stage: a real BPE, tokenized datasets stored with `datasets`, digests, the tokenized suite."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from lmforge.config.model import ModelConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import PhaseConfig, TrainingConfig
from lmforge.config.validation import ValidationConfig
from lmforge.core.errors import ConfigError, DataError, ValidationFailed
from lmforge.core.workspace import Workspace
from lmforge.data.documents import text_id, write_documents
from lmforge.data.packing import IGNORE_INDEX
from lmforge.data.tokenized import load_tokenized
from lmforge.stages.tokenize import check_vocab, tokenize
from lmforge.stages.validate import validate_tokenized
from lmforge.tokenizer.build import load_tokenizer
from lmforge.train.data import ON_THE_FLY, phase_rows

TOPICS = ["rivers carry sand to the sea", "bees dance to show where flowers are", "glaciers flow downhill",
          "bread rises because yeast makes gas", "chess openings fight for the centre", "tea leaves oxidise",
          "lighthouses warn ships at night", "stone walls stand without mortar", "birds migrate by the stars",
          "octopuses change colour in a second", "sundials tell solar time", "compost turns scraps to soil"]
MODEL = ModelConfig(vocab_size=400)
TRAINING = TrainingConfig(pretrain=PhaseConfig(steps=1, learning_rate=1e-3, seq_len=32),
                          finetune=PhaseConfig(steps=1, learning_rate=1e-3, seq_len=64))


def _doc(text: str) -> dict:
    return {"id": text_id(text), "text": text, "source": "local", "uri": "file:///x", "title": "x",
            "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain", "meta": "{}"}


def _write_inputs(ws: Workspace) -> None:
    docs = [_doc(f"Document {i}: {topic}. " * 3) for i, topic in enumerate(TOPICS)]
    write_documents(ws.curated_dir / "train.parquet", docs[2:])
    write_documents(ws.curated_dir / "validation.parquet", docs[:2])
    records = [{"id": f"r{i}", "instruction": f"What is true of topic {i}?", "response": topic.capitalize() + "."}
               for i, topic in enumerate(TOPICS * 3)]
    ws.sft_dir.mkdir(parents=True, exist_ok=True)
    (ws.sft_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[4:]))
    (ws.sft_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("tok"))
    _write_inputs(ws)
    return ws, tokenize(TokenizeConfig(), MODEL, TRAINING, ws)


def test_datasets_are_stored_versioned_and_reproducible(built):
    ws, result = built
    assert result.rows["pretrain"]["validation"] >= 1 and result.rows["finetune"]["test"] == 4
    assert result.rows["finetune"]["train"] + result.rows["finetune"]["validation"] == 32
    import datasets

    stored = datasets.load_from_disk(str(ws.tokenized_dir / result.digest / "pretrain" / "train"))
    assert stored.column_names == ["input_ids", "labels", "attention_mask"]
    assert tokenize(TokenizeConfig(), MODEL, TRAINING, ws).digest == result.digest  # same inputs, same digest
    manifest = json.loads((ws.tokenized_dir / result.digest / "manifest.json").read_text())
    assert manifest["seq_len"] == {"pretrain": 32, "finetune": 64} and manifest["vocab_size"] <= 400


def test_pretrain_rows_are_packed_with_eos_separators(built):
    ws, _ = built
    tokenizer = load_tokenizer(ws.tokenizer_dir)
    rows = load_tokenized(ws, "pretrain", "train")
    assert set(rows) == {"input_ids", "labels", "attention_mask"}
    assert rows["input_ids"].dtype == torch.long and rows["input_ids"].shape[1] == 32
    assert torch.equal(rows["labels"], rows["input_ids"]) and bool(rows["attention_mask"].all())
    flat = rows["input_ids"].flatten().tolist()
    train_documents = len(TOPICS) - 2
    assert flat.count(tokenizer.eos_token_id) in (train_documents - 1, train_documents)  # the tail block is dropped
    first = tokenizer.decode(flat[: flat.index(tokenizer.eos_token_id)])
    assert first.startswith("Document 2: glaciers")  # train documents in curated order, nothing lost in front


def test_finetune_rows_mask_the_prompt(built):
    ws, _ = built
    tokenizer = load_tokenizer(ws.tokenizer_dir)
    rows = load_tokenized(ws, "finetune", "test")
    assert rows["input_ids"].shape == (4, 64)
    for ids, labels, mask in zip(rows["input_ids"], rows["labels"], rows["attention_mask"]):
        supervised = labels != IGNORE_INDEX
        assert not supervised[0] and supervised.any()
        assert torch.equal(labels[supervised], ids[supervised])
        text = tokenizer.decode(ids[mask.bool()])
        assert text.startswith("### Instruction:\nWhat is true of topic") and "### Response:\n" in text
        assert tokenizer.decode(labels[supervised]).endswith(tokenizer.eos_token)


def test_per_document_position_ids(tmp_path):
    ws = Workspace(tmp_path)
    _write_inputs(ws)
    result = tokenize(TokenizeConfig(cross_document_attention=False), MODEL, TRAINING, ws)
    rows = load_tokenized(ws, "pretrain", "train")
    eos = load_tokenizer(ws.tokenizer_dir).eos_token_id
    ids, positions = rows["input_ids"].flatten(), rows["position_ids"].flatten()
    after_eos = torch.nonzero(ids[:-1] == eos).flatten() + 1
    assert bool((positions[after_eos] == 0).all()) and positions[0] == 0
    assert int((positions == 0).sum()) == len(after_eos) + 1  # a new document starts nowhere else
    assert result.digest != tokenize(TokenizeConfig(), MODEL, TRAINING, ws).digest


def test_tokenized_suite_passes_and_catches_leaked_splits(built, tmp_path):
    ws, _ = built
    report = validate_tokenized(ValidationConfig(data_docs=False), ws)
    assert report.success and {r["name"] for r in report.results} >= {"unknown_token_rate", "label_masking",
                                                                       "splits_disjoint", "sequence_length"}
    leaky = Workspace(tmp_path / "leaky")
    shutil.copytree(ws.home / "data", leaky.home / "data")
    shutil.copy(leaky.sft_dir / "train.jsonl", leaky.sft_dir / "test.jsonl")  # the test set is the train set
    tokenize(TokenizeConfig(), MODEL, TRAINING, leaky)
    with pytest.raises(ValidationFailed, match="splits_disjoint") as info:
        validate_tokenized(ValidationConfig(data_docs=False), leaky)
    assert "finetune/" in info.value.report


def test_vocabulary_that_does_not_fit_the_model_is_an_error(built, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("model.vocab_size")) as info:
        check_vocab(600, ModelConfig(vocab_size=512))
    assert "600" in info.value.cause
    ws, _ = built
    moved = Workspace(tmp_path / "moved")
    shutil.copytree(ws.home, moved.home)
    (moved.tokenizer_dir / "tokenizer.json").write_text((moved.tokenizer_dir / "tokenizer.json").read_text() + " ")
    with pytest.raises(DataError, match="another tokenizer"):
        load_tokenized(moved, "pretrain", "train")


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="lmforge tokenize"):
        load_tokenized(Workspace(tmp_path), "pretrain", "train")
    with pytest.raises(DataError, match="curate"):
        tokenize(TokenizeConfig(), MODEL, TRAINING, Workspace(tmp_path))


def test_on_the_fly_and_prebuilt_data_hold_out_the_same_records(tmp_path):
    """Training without prebuilt datasets validates on exactly the rows `tokenize` holds out."""
    ws = Workspace(tmp_path)
    _write_inputs(ws)
    fraction = 0.25
    tokenize(TokenizeConfig(finetune_heldout_fraction=fraction), MODEL, TRAINING, ws)
    tokenizer = load_tokenizer(ws.tokenizer_dir)
    phases = {"pretrain": TRAINING.pretrain, "finetune": TRAINING.finetune}
    built = {name: phase_rows(name, tokenizer, ws, phase, fraction) for name, phase in phases.items()}
    assert all(source.startswith("tokenized dataset") for _, _, source in built.values())
    shutil.rmtree(ws.tokenized_dir)  # the same workspace, now without prebuilt datasets
    for name, phase in phases.items():
        fly_train, fly_val, source = phase_rows(name, tokenizer, ws, phase, fraction)
        built_train, built_val, _ = built[name]
        assert source == ON_THE_FLY
        for column in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(fly_train[column], built_train[column]), (name, column)
            assert torch.equal(fly_val[column], built_val[column]), (name, column)
    # The configured share of the 32 SFT train records, not one record.
    assert 4 <= len(built["finetune"][1]["input_ids"]) <= 14
