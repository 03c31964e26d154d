"""Training rows from workspace data, and the deterministic rank-sharded batch stream.

:func:`phase_rows` gives a phase its training and held-out rows: the tokenized datasets `lmforge
tokenize` built and the data gate validated when they fit the phase, else the same rows built on
the fly from the curated text (:func:`lmforge.data.packing.pack_documents`) and the SFT records
(:func:`encode_sft`; validation records cut by :func:`lmforge.data.sft.split_finetune` with the
same fraction). The tokenize stage builds its rows with these same functions. SFT records are
rendered with the tokenizer's chat template (:mod:`lmforge.model.chat`) and masked so the loss
covers the assistant turns only. Each DDP rank reads a disjoint shard of every epoch's seeded
permutation (:func:`batch_stream`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from lmforge.config.training import PhaseConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.data.packing import IGNORE_INDEX, pack_documents
from lmforge.data.sft import read_sft, sft_file, split_finetune
from lmforge.data.tokenized import latest_manifest, load_tokenized
from lmforge.model.chat import conversation, encode_chat, end_of_turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Tensors = dict[str, torch.Tensor]
ON_THE_FLY = "tokenized on the fly"


def phase_rows(name: str, tokenizer: PreTrainedTokenizerBase, ws: Workspace, phase: PhaseConfig,
               finetune_heldout_fraction: float) -> tuple[Tensors, Tensors | None, str]:
    """(training rows, held-out rows or None, where they came from) for the phase ``name``.

    ``finetune_heldout_fraction`` is ``tokenize.finetune_heldout_fraction``, which the train stage
    puts in the job: on the fly, fine-tuning holds out the records the tokenize stage would.
    """
    prebuilt = prebuilt_rows(ws, name, phase.seq_len, finetune_heldout_fraction)
    if prebuilt is not None:
        return prebuilt
    if name == "pretrain":
        # pyarrow only here, where curated Parquet is read: the training engine runs on GPU machines
        # that have torch, transformers and peft but no pyarrow (the benchmarks bring their own data).
        from lmforge.data.documents import read_texts

        train_rows = pack_documents(read_texts(ws.curated_dir / "train.parquet"), tokenizer, phase.seq_len)
        val_path = ws.curated_dir / "validation.parquet"
        val_texts = read_texts(val_path) if val_path.exists() else []
        val_rows = pack_documents(val_texts, tokenizer, phase.seq_len, allow_short=True) if val_texts else None
        return train_rows, val_rows, ON_THE_FLY
    records, heldout = split_finetune(read_sft(sft_file(ws, "train")), finetune_heldout_fraction)
    val_rows = encode_sft(heldout, tokenizer, phase.seq_len) if heldout else None
    return encode_sft(records, tokenizer, phase.seq_len), val_rows, ON_THE_FLY


def prebuilt_rows(ws: Workspace, name: str, seq_len: int,
                  finetune_heldout_fraction: float) -> tuple[Tensors, Tensors | None, str] | None:
    """The tokenized datasets `lmforge tokenize` built and validated, when they fit this phase
    (its seq_len and, for fine-tuning, the held-out fraction).

    Training reads what the data gate checked. Without them (a bare GPU machine without the
    `datasets` library, or `tokenize.build_datasets: false`) the phase tokenizes on the fly.
    Datasets built with another tokenizer raise a DataError from load_tokenized.
    """
    if importlib.util.find_spec("datasets") is None:
        return None
    try:
        manifest = latest_manifest(ws)
    except DataError:
        return None
    if manifest.get("seq_len", {}).get(name) != seq_len:
        return None
    built_fraction = manifest.get("config", {}).get("finetune_heldout_fraction")
    if name == "finetune" and built_fraction != finetune_heldout_fraction:
        return None
    train_rows = load_tokenized(ws, name, "train")
    val_rows = load_tokenized(ws, name, "validation")
    source = f"tokenized dataset {manifest['digest'][:16]}"
    return train_rows, (val_rows if len(val_rows["input_ids"]) else None), source


def encode_sft(records: list[dict], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Tensors:
    """Right-padded rows of SFT records; labels are the tokens of every assistant turn, IGNORE_INDEX
    on system, user and tool turns, template headers and padding (:func:`lmforge.model.chat.encode_chat`).

    A record whose first assistant turn starts at or past ``seq_len`` is dropped (nothing it answers
    would fit: no loss to learn from); no records give no rows.
    """
    end_turn = end_of_turn(tokenizer)
    rows = []
    for number, record in enumerate(records, start=1):
        messages, tools = conversation(record)
        ids, labels = encode_chat(tokenizer, messages, tools, end_turn=end_turn,
                                  record_id=str(record.get("id") or f"#{number}"))
        if all(label == IGNORE_INDEX for label in labels[:seq_len]):
            continue
        rows.append((ids[:seq_len], labels[:seq_len]))
    if records and not rows:
        raise DataError(f"all {len(records)} SFT examples have prompts longer than seq_len={seq_len}",
                        "raise training.finetune.seq_len (and model.max_seq_len)")
    input_ids = torch.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    labels_out = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels_out[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels_out, "attention_mask": mask}


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
                        "add data, lower seq_len, or use fewer training.placement.num_workers")
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
