"""Training tensors from workspace data, and the deterministic rank-sharded batch stream.

Pretraining text is packed into fixed-length blocks (documents joined by EOS, no padding wasted);
SFT pairs are rendered with :func:`lmforge.model.prompt.format_example` and masked so the loss covers the
response only. Each DDP rank reads a disjoint shard of every epoch's seeded permutation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

from lmforge.core.errors import DataError
from lmforge.model.prompt import EOS_TOKEN, format_example

IGNORE_INDEX = -100  # label value torch's cross-entropy skips
Tensors = dict[str, torch.Tensor]


def read_texts(path: Path) -> list[str]:
    """The ``text`` column of a curated Parquet file."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"no curated text at {path}", "run the curate stage first (`lmforge curate`)")
    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]


def read_sft(path: Path) -> list[dict]:
    """Instruction/response records of an SFT JSONL file."""
    if not path.exists():
        raise DataError(f"no SFT examples at {path}",
                        "run the collect stage first, or set training.method: pretrain")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, record in enumerate(records):
        if not isinstance(record.get("instruction"), str) or not isinstance(record.get("response"), str):
            raise DataError(f"{path} line {i + 1} lacks a string 'instruction' or 'response'",
                            "regenerate the SFT set with the collect stage")
    return records


def split_heldout(records: list[dict], fraction: float = 0.05) -> tuple[list[dict], list[dict]]:
    """(train, held-out) chosen by a hash of each record, so the split never depends on order."""
    def bucket(record: dict) -> float:
        key = str(record.get("id") or record["instruction"] + record["response"])
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [r for r in records if bucket(r) >= fraction]
    heldout = [r for r in records if bucket(r) < fraction]
    if not heldout and len(records) > 1:  # tiny sets: still measure something
        train, heldout = records[:-1], records[-1:]
    return train, heldout


def pack_texts(texts: list[str], tokenizer, seq_len: int, allow_short: bool = False) -> Tensors:
    """Token blocks of exactly ``seq_len`` (the tail is dropped), each document ended by EOS.

    ``allow_short`` returns one shorter block when the text cannot fill a whole one (used for
    small held-out sets, where some measurement beats none).
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        if not allow_short or len(ids) < 2:
            raise DataError(f"the text holds {len(ids)} tokens, fewer than one block of seq_len={seq_len}",
                            "collect more text, or lower the phase's seq_len")
        block = torch.tensor([ids], dtype=torch.long)
    else:
        block = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return {"input_ids": block, "labels": block.clone(), "attention_mask": torch.ones_like(block)}


def encode_sft(records: list[dict], tokenizer, seq_len: int) -> Tensors:
    """Right-padded prompt+response rows; labels are IGNORE_INDEX on the prompt and padding.

    Prompt and response are tokenized separately, exactly as serving tokenizes a prompt and then
    generates, so training and inference see the same token boundary.
    """
    rows, dropped = [], 0
    for record in records:
        prompt, completion = format_example(record["instruction"], record["response"])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion.removesuffix(EOS_TOKEN), add_special_tokens=False)["input_ids"]
        # EOS by id: a pretrained base may not know our EOS string as a special token.
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) >= seq_len:  # nothing of the answer would fit: no loss to learn from
            dropped += 1
            continue
        ids = (prompt_ids + answer_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:seq_len]
        rows.append((ids, labels))
    if not rows:
        raise DataError(f"all {dropped} SFT examples have prompts longer than seq_len={seq_len}",
                        "raise training.finetune.seq_len (and model.max_seq_len)")
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def batch_stream(data: Tensors, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, skip: int = 0) -> Iterator[Tensors]:
    """Endless batches for one rank: consecutive global batches of seeded epoch permutations.

    Each global batch is ``batch_size * world_size`` consecutive rows of the permutations (one
    per epoch, joined end to end); rank ``r`` takes its ``r``-th slice. So N ranks of batch B see
    exactly the rows one worker of batch N*B sees, which makes DDP match a single worker; within
    an epoch the ranks' rows are disjoint. ``skip`` passes over that many batches first without
    gathering them: the data position of a resumed run.
    """
    n = len(data["input_ids"])
    if n // world_size == 0:
        raise DataError(f"{n} training rows cannot be shared by {world_size} workers",
                        "add data, lower seq_len, or use fewer training.num_workers")
    span = batch_size * world_size
    buffer: list[int] = []
    epoch = 0
    taken = 0
    while True:
        while len(buffer) < span:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            buffer.extend(torch.randperm(n, generator=generator).tolist())
            epoch += 1
        mine = buffer[rank * batch_size:(rank + 1) * batch_size]
        del buffer[:span]
        taken += 1
        if taken > skip:
            index = torch.tensor(mine)
            yield {key: value[index] for key, value in data.items()}


def fixed_batches(data: Tensors, batch_size: int, max_batches: int, *, rank: int = 0,
                  world_size: int = 1) -> list[Tensors]:
    """This rank's share of the first ``max_batches * batch_size * world_size`` held-out rows."""
    rows = torch.arange(min(len(data["input_ids"]), max_batches * batch_size * world_size))
    mine = rows[rank::world_size]
    # A rank with no rows gets no batches (split() of an empty tensor yields one empty chunk);
    # evaluate_loss still joins the all-reduce, so ranks stay in step.
    return [{key: value[chunk] for key, value in data.items()} for chunk in mine.split(batch_size) if len(chunk)]
