"""The data helpers every stage shares: SFT records, the fine-tuning split, packing and SFT encoding."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_assets import build_tokenizer

from lmforge.core.errors import DataError
from lmforge.data.packing import IGNORE_INDEX, pack_documents
from lmforge.data.sft import read_sft, split_finetune
from lmforge.data.splits import hash_split, split_bucket
from lmforge.model.prompt import format_prompt
from lmforge.train.data import encode_sft


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_sft_accepts_pairs_and_chats_and_names_the_bad_line(tmp_path):
    pair = json.dumps({"instruction": "What does `abs` do?", "response": "Absolute value."})
    chat = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}]})
    path = _write(tmp_path / "train.jsonl", [pair, "", chat, pair])
    assert len(read_sft(path)) == 3 and len(read_sft(path, limit=1)) == 1
    for bad in ('{"instruction": "no response"}', "[1, 2]", "{not json", '{"messages": []}'):
        with pytest.raises(DataError, match=re.escape("train.jsonl:2")) as info:
            read_sft(_write(tmp_path / "train.jsonl", [pair, bad]))
        assert "lmforge collect" in info.value.fix
    with pytest.raises(DataError, match="no SFT examples"):
        read_sft(tmp_path / "missing.jsonl")


def test_finetune_split_is_salted_apart_from_collects_split():
    records = [{"id": f"pair-{i}", "instruction": f"q{i}", "response": f"a{i}"} for i in range(400)]
    train, _test = hash_split(records, 0.2)  # what collect writes to sft/{train,test}.jsonl
    kept, held = split_finetune(train, 0.1)
    # Unsalted, every train record's bucket is >= 0.2, so a cut at 0.1 would hold out one record.
    assert all(split_bucket(r["id"]) >= 0.2 for r in train)
    assert 0.05 * len(train) < len(held) < 0.15 * len(train)
    assert sorted(kept + held, key=lambda r: r["id"]) == train
    assert [r for r in train if r in held] == held  # file order kept on both sides
    assert split_finetune(list(reversed(train)), 0.1)[1] == list(reversed(held))  # order never decides
    assert len(split_finetune(train[:2], 0.01)[1]) == 1  # two records: one on each side


def test_pack_documents_blocks_positions_and_short_sets(tokenizer):
    texts = ["Return the absolute value of a number.", "Deserialize s to a Python object."] * 3
    rows = pack_documents(texts, tokenizer, 8, with_positions=True)
    ids, positions = rows["input_ids"].flatten(), rows["position_ids"].flatten()
    assert rows["input_ids"].shape[1] == 8 and torch.equal(rows["labels"], rows["input_ids"])
    after_eos = torch.nonzero(ids[:-1] == tokenizer.eos_token_id).flatten() + 1
    assert bool((positions[after_eos] == 0).all()) and int((positions == 0).sum()) == len(after_eos) + 1
    assert len(pack_documents(texts, tokenizer, 8, max_blocks=2)["input_ids"]) == 2
    short = pack_documents(texts[:1], tokenizer, 512, allow_short=True)["input_ids"]
    assert short.shape[0] == 1 and short[0, -1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="fewer than one block of seq_len=512") as info:
        pack_documents(texts[:1], tokenizer, 512)
    assert "seq_len" in info.value.fix


def test_encode_sft_masks_the_prompt_of_pairs_and_chats(tokenizer):
    pair = {"instruction": "What does `len` do?", "response": "Return the number of items."}
    chat = {"messages": [{"role": "user", "content": pair["instruction"]},
                         {"role": "assistant", "content": pair["response"]}]}
    rows = encode_sft([pair, chat], tokenizer, seq_len=48)
    # The chat template renders a one-turn chat as the instruction prompt: the same row.
    assert torch.equal(rows["input_ids"][0], rows["input_ids"][1]) and torch.equal(rows["labels"][0], rows["labels"][1])
    n_prompt = len(tokenizer(format_prompt(pair["instruction"]), add_special_tokens=False)["input_ids"])
    labels = rows["labels"][0]
    assert (labels[:n_prompt] == IGNORE_INDEX).all() and labels[n_prompt] != IGNORE_INDEX
    assert encode_sft([], tokenizer, seq_len=48)["input_ids"].shape == (0, 48)
    with pytest.raises(DataError, match="all 1 SFT examples"):
        encode_sft([pair], tokenizer, seq_len=4)
    with pytest.raises(DataError, match="assistant"):
        encode_sft([{"messages": chat["messages"][:1]}], tokenizer, seq_len=48)
