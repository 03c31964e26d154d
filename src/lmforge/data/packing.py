"""Packing: documents, each ended by EOS, joined and cut into fixed-length blocks (no padding wasted).

Every path from documents to rows goes through :func:`pack_documents`: the tokenize stage (stored
datasets, see :mod:`lmforge.data.tokenized`), training on the fly (:mod:`lmforge.train.data`) and
the evaluate stage's held-out perplexity; so a dataset built ahead and one built on the fly hold
the same rows. Rows are long tensors shaped (rows, seq_len): ``input_ids``, ``labels``,
``attention_mask``, and ``position_ids`` where asked for; SFT rows
(:func:`lmforge.train.data.encode_sft`) have the same columns, with labels IGNORE_INDEX wherever
no loss is taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING

import torch

from lmforge.core.errors import DataError

if TYPE_CHECKING:  # annotations only: data/ runs without transformers
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the loss skips (as torch's cross-entropy does)
Rows = dict[str, torch.Tensor]


def pack_documents(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, *, allow_short: bool = False,
                   max_blocks: int | None = None, with_positions: bool = False, batch_size: int = 256,
                   what: str = "the documents",
                   fix: str = "collect more text, or lower training.pretrain.seq_len") -> Rows:
    """Blocks of exactly ``seq_len`` tokens (the tail is dropped), each document ended by EOS.

    ``allow_short`` returns one shorter block when the text cannot fill a whole one (small
    held-out sets, where some measurement beats none). ``max_blocks`` keeps the first blocks only
    and stops tokenizing once they are full. ``with_positions`` adds per-document
    ``position_ids`` (0 at each document's first token), for attention kept inside each document.
    ``what`` and ``fix`` word the error raised when the text is too short.
    """
    limit = seq_len * max_blocks if max_blocks is not None else None
    ids, positions = _document_tokens(texts, tokenizer, limit, batch_size)
    blocks = len(ids) // seq_len if limit is None else min(len(ids), limit) // seq_len
    width = seq_len
    if blocks == 0:
        if not allow_short or len(ids) < 2:
            wanted = "2, too few to predict a next token" if allow_short else f"one block of seq_len={seq_len}"
            raise DataError(f"{what} hold {len(ids)} tokens, fewer than {wanted}", fix)
        blocks, width = 1, len(ids)
    matrix = torch.tensor(ids[: blocks * width], dtype=torch.long).view(blocks, width)
    rows = {"input_ids": matrix, "labels": matrix.clone(), "attention_mask": torch.ones_like(matrix)}
    if with_positions:
        rows["position_ids"] = torch.tensor(positions[: blocks * width], dtype=torch.long).view(blocks, width)
    return rows


def _document_tokens(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, limit: int | None,
                     batch_size: int) -> tuple[list[int], list[int]]:
    """Token ids of the documents, each followed by EOS, and each token's position in its document."""
    ids: list[int] = []
    positions: list[int] = []
    eos = tokenizer.eos_token_id
    for batch in _batches(texts, batch_size):
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eos)
            positions.extend(range(len(encoded) + 1))
        if limit is not None and len(ids) >= limit:
            break
    return ids, positions


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
