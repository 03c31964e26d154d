"""Held-out text scoring: every token of every document predicted once, so loss per token and bits
per byte describe exactly the same text.

How the bytes match the scored tokens: the documents are first chosen within a token budget
(:func:`select_heldout`; the document that crosses the budget is cut there, and the cut text is
what a frozen set stores). Scoring then never truncates again: the token stream is
``[EOS] doc_1 [EOS] doc_2 [EOS] ...``, cut into windows of ``window`` tokens that overlap by one
token, so each token after the leading EOS is predicted exactly once (the first token of a window
is the last of the one before, context only). The byte count is the UTF-8 length of the
documents, which are exactly the texts handed to the tokenizer. The NLL includes predicting each
document's closing EOS, as training does; every tokenizer predicts one EOS per document, so that
term does not favour one tokenizer over another.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmforge.core.errors import DataError
from lmforge.data.packing import IGNORE_INDEX
from lmforge.evaluation.metrics import bits_per_byte, perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.model.types import CausalLM


@dataclass(frozen=True)
class HeldoutScore:
    nll_nats: float  # summed over every predicted token
    tokens: int  # predicted tokens (document tokens and one EOS per document)
    bytes: int  # UTF-8 bytes of the scored documents
    documents: int

    @property
    def loss(self) -> float:
        return self.nll_nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll_nats, self.bytes)


def select_heldout(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[str]:
    """Documents in order until ``max_tokens`` tokens (each document counted with its EOS).

    The document that crosses the budget is cut at a token boundary, so the budget holds and the
    cut text is still plain text that any later tokenizer can score.
    """
    chosen: list[str] = []
    used = 0
    for text in texts:
        if not text:
            continue
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast))
        ids = encoded["input_ids"]
        if used + len(ids) + 1 <= max_tokens:
            chosen.append(text)
            used += len(ids) + 1
            continue
        room = max_tokens - used - 1  # tokens left for this document before its EOS
        if room > 0:
            if tokenizer.is_fast:
                cut = text[: encoded["offset_mapping"][room - 1][1]]
            else:  # a slow tokenizer has no offsets; its decoded prefix is the text to store
                cut = str(tokenizer.decode(ids[:room]))
            if cut.strip():
                chosen.append(cut)
        break
    return chosen


def stream_windows(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, window: int) -> list[list[int]]:
    """``[EOS] doc [EOS] doc ...`` cut into windows of ``window`` tokens overlapping by one."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the model's tokenizer has no EOS token, so documents cannot be delimited",
                        "save the tokenizer with an eos_token (lmforge's trained tokenizers have one)")
    if window < 2:
        raise DataError(f"a scoring window of {window} tokens predicts nothing", "raise evaluation.block_size")
    ids = [eos]
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    step = window - 1
    return [ids[start : start + window] for start in range(0, len(ids) - 1, step)]


def score_heldout(model: CausalLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], window: int,
                  batch_size: int) -> HeldoutScore:
    """Summed next-token NLL over every token of ``texts`` (see the module docstring for the scheme)."""
    windows = stream_windows(texts, tokenizer, window)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(w) for w in batch)
        # Right padding: a causal model's real positions never see the padded ones after them,
        # and the padded targets are ignored.
        ids = torch.tensor([w + [pad] * (width - len(w)) for w in batch], dtype=torch.long)
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch], dtype=torch.long)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               reduction="sum", ignore_index=IGNORE_INDEX)
        total += loss.item()
        count += int((targets != IGNORE_INDEX).sum())
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return HeldoutScore(nll_nats=total, tokens=count, bytes=n_bytes, documents=len(texts))
