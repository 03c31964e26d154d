"""Speculative decoding's proposers: who guesses a sequence's next tokens before the model verifies them.

Two kinds (``serving.speculative.method``), one shape (:class:`Proposer`):

- :class:`NgramProposer` (prompt lookup, no model): the last ``n`` tokens of the prompt plus output
  so far are searched for earlier in the same context (longest ``n`` first, from ``ngram_max`` down
  to ``ngram_min``; the latest match), and the tokens that followed that match are proposed. Its
  proposals are point masses (q(x) = 1), which is what the rejection sampling of
  ``engine/speculative.py`` assumes when :attr:`Proposal.probs` is None. It pays off when the output
  copies spans of the prompt (code edits, quoting, extraction).
- :class:`DraftProposer`: a small Llama-family model with the same tokenizer, on the paged backend
  with its own small KV cache, runs ``k`` steps (greedy or sampled under the request's own
  temperature, top-k and top-p) and hands back the distribution it sampled each token from. Its
  cache holds each sequence's context up to a valid length; proposals the model rejects are rolled
  back by lowering that length (their positions are overwritten when the sequence gets there again).

The engine thread owns both (not thread-safe).
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lmforge.serving.backends.base import PrefillItem
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.engine.sampling import filtered_probs
from lmforge.serving.engine.sequence import Sequence


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), vocab]: the distribution each was drawn from; None = point masses


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        """Up to ``limits[i]`` proposed tokens to follow ``seqs[i]``'s context (its prompt and output so far)."""
        ...

    def accepted(self, seqs: list[Sequence], counts: list[int]) -> None:
        """``counts[i]`` of ``seqs[i]``'s last proposal were accepted (the rest are to be forgotten)."""
        ...

    def retain(self, seqs: list[Sequence]) -> None:
        """Forget every sequence but ``seqs`` (the others finished or left)."""
        ...


def draw(probs: torch.Tensor, rngs: Seq[random.Random]) -> list[int]:
    """One token per row of ``probs`` ([rows, vocab], rows summing to about 1) by the inverse CDF at a
    uniform from that row's generator (a point mass gives its token)."""
    cdf = probs.float().cumsum(-1)
    # 1 - random() is in (0, 1]: u > 0 never picks a leading zero-probability token.
    u = torch.tensor([1.0 - rng.random() for rng in rngs], dtype=cdf.dtype, device=cdf.device)[:, None]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=probs.shape[-1] - 1).squeeze(1).tolist()


def ngram_lookup(context: Seq[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The up to ``k`` tokens that followed the latest earlier occurrence of ``context``'s last ``n``
    tokens, for the longest ``n`` in ``[n_min, n_max]`` that has one; empty when none does."""
    arr = np.asarray(context, dtype=np.int64)
    length = len(arr)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # Windows starting at 0..length-1-n: every match has at least one token after it.
        windows = sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == arr[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


class NgramProposer:
    """Prompt lookup: propose what followed the context's suffix the last time it appeared."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        return [Proposal(ngram_lookup(s.prompt + s.token_ids, k, self.n_min, self.n_max) if k > 0 else [])
                for s, k in zip(seqs, limits)]

    def accepted(self, seqs: list[Sequence], counts: list[int]) -> None:
        pass  # stateless

    def retain(self, seqs: list[Sequence]) -> None:
        pass


@dataclass(eq=False)
class _DraftRow:
    seq: Sequence
    row: int
    valid: int = 0  # leading context positions whose keys and values the draft cache holds
    base: int = 0  # context length at the last proposal
    fed: int = 0  # proposed tokens of the last proposal fed to the draft (all but the last)


class DraftProposer:
    """A small model on its own paged backend proposes ``k`` tokens by decoding them."""

    def __init__(self, backend: PagedBackend) -> None:
        self.backend = backend
        self.rows: dict[int, _DraftRow] = {}  # id(seq) -> its draft cache row

    def retain(self, seqs: list[Sequence]) -> None:
        live = {id(s) for s in seqs}
        for key in [key for key in self.rows if key not in live]:
            self.backend.release(self.rows.pop(key).row)

    def _row(self, seq: Sequence) -> _DraftRow | None:
        state = self.rows.get(id(seq))
        if state is None:
            need = len(seq.prompt) + seq.params.max_tokens
            if not self.backend.can_reserve(need):
                return None  # the draft cache is full: this sequence decodes without proposals for now
            state = self.rows[id(seq)] = _DraftRow(seq, self.backend.reserve(need))
        return state

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        proposals = [Proposal([]) for _ in seqs]
        todo = [(i, state) for i, (s, k) in enumerate(zip(seqs, limits)) if k > 0 and (state := self._row(s))]
        if not todo:
            return proposals
        contexts = [seqs[i].prompt + seqs[i].token_ids for i, _ in todo]
        items = [PrefillItem(state.row, state.valid, ctx[state.valid :]) for (_, state), ctx in zip(todo, contexts)]
        logits = torch.cat([rows[-1:] for rows in self.backend.prefill(items)])
        for (_, state), ctx in zip(todo, contexts):
            state.valid = state.base = len(ctx)
            state.fed = 0
        step = 0
        while True:
            params = [seqs[i].params for i, _ in todo]
            probs = filtered_probs(logits, params)  # a copy: the next launch may reuse the logits' buffer
            tokens = draw(probs, [seqs[i].rng for i, _ in todo])
            for j, (i, _) in enumerate(todo):
                proposals[i].tokens.append(tokens[j])
                before, rows = proposals[i].probs, probs[j : j + 1]
                proposals[i].probs = rows if before is None else torch.cat([before, rows])
            step += 1
            keep = [j for j, (i, _) in enumerate(todo) if limits[i] > step]
            if not keep:
                return proposals
            todo = [todo[j] for j in keep]
            for _, state in todo:
                state.fed += 1
            logits = self.backend.decode([state.row for _, state in todo], [state.base + step - 1 for _, state in todo],
                                         [tokens[j] for j in keep])

    def accepted(self, seqs: list[Sequence], counts: list[int]) -> None:
        for seq, count in zip(seqs, counts):
            state = self.rows.get(id(seq))
            if state is not None and state.base:
                # The accepted proposals the draft saw stay; later positions are rewritten next time.
                state.valid = state.base + min(count, state.fed)
                state.base = state.fed = 0
