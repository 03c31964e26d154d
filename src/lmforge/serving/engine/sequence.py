"""One admitted request as the engine thread decodes it, and how its tokens become deltas.

:class:`Sequence` holds everything per request (its cache row, prompt progress, generated ids,
text tracker, random source, logprobs, timing); :func:`emit` applies one chosen token: text delta,
stop and length rules, the final :class:`Completion`; :func:`prompt_logprobs` turns a prefill
chunk's logits into the echo's per-token prompt logprobs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from lmforge.serving.engine.requests import Completion, Delta, Request, send
from lmforge.serving.engine.sampling import SamplingParams, TextTracker, TokenLogprob, token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.serving.engine.structured import GrammarState


@dataclass(eq=False)  # a sequence is itself: lists of them are searched by identity, never by content
class Sequence:
    request: Request
    row: int  # backend row holding its KV cache; -1 while preempted (it holds none)
    tracker: TextTracker
    rng: random.Random
    admitted: int = 0  # admission order (the most recently admitted is preempted first)
    preemptions: int = 0  # times its cache was taken back and recomputed
    prefilled: int = 0  # tokens of ``prefill_ids`` already in the cache
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission (usage's cached_tokens)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_entries: list[TokenLogprob] | None = None  # echo: one per prompt token
    pending_logits: torch.Tensor | None = None  # last logits of the previous prefill chunk (echo)
    next_token: int = -1  # chosen, not yet fed to the model
    first_token_at: float | None = None
    last_token_at: float = 0.0
    prompt_sent: bool = False
    grammar: GrammarState | None = None  # a response_format's matcher (engine/structured.py)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prefill_ids(self) -> list[int]:
        """The tokens to prefill: the prompt, and after a preemption also the tokens generated so far
        (recomputed, so the sequence goes on where it stopped)."""
        return self.request.prompt_ids + self.token_ids if self.token_ids else self.request.prompt_ids

    @property
    def position(self) -> int:
        """Position at which ``next_token`` is fed."""
        return len(self.prompt) + len(self.token_ids) - 1


def emit(seq: Sequence, token: int, entry: TokenLogprob | None, eos_ids: set[int]) -> bool:
    """Apply ``token`` to ``seq`` and send its delta; True when the sequence is finished."""
    params = seq.params
    request = seq.request
    seq.token_ids.append(token)
    seq.next_token = token
    if entry is not None:
        seq.logprobs.append(entry)
        if request.streamed:
            seq.unsent_logprobs.append(entry)
    tracker = seq.tracker
    finish: str | None = None
    if token in eos_ids and not params.ignore_eos:
        text, finish = tracker.flush(), "stop"
    elif not request.streamed and not params.stop and request.ends_output is None:
        # Nobody reads this text before the end, and no rule needs it: decode it once, when it finishes.
        tracker.defer(token)
        if len(seq.token_ids) < params.max_tokens:
            return request.cancelled.is_set()
        text, finish = tracker.flush(), "length"
    else:
        text = tracker.add(token)
        ends = request.ends_output
        if text and ends is not None and ends(text):
            tracker.stopped = True  # ended as by a stop string (the scheduler counts it "stop")
        if tracker.stopped:
            finish = "stop"
        elif len(seq.token_ids) >= params.max_tokens:
            text, finish = text + tracker.flush(), "length"
    if finish is None:
        if not request.streamed:
            return request.cancelled.is_set()  # its sink reads the final delta alone
        if not text and (seq.prompt_sent or seq.prompt_entries is None):
            return False  # held back (incomplete character or possible stop string)
    send_delta(seq, text, finish)
    return finish is not None or request.cancelled.is_set()


def send_delta(seq: Sequence, text: str, finish: str | None) -> None:
    completion = None
    if finish is not None:
        completion = Completion(
            text=seq.tracker.text,
            token_ids=tuple(seq.token_ids),
            finish_reason=finish,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.token_ids),
            cached_tokens=seq.cached_tokens,
            logprobs=tuple(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=tuple(seq.prompt_entries) if seq.prompt_entries is not None else None,
        )
    prompt = None
    if seq.prompt_entries is not None and not seq.prompt_sent:
        prompt, seq.prompt_sent = tuple(seq.prompt_entries), True
    unsent = seq.unsent_logprobs
    logprobs: tuple[TokenLogprob, ...] = ()
    if unsent:
        logprobs = tuple(unsent)
        unsent.clear()
    send(seq.request, Delta(text, logprobs, completion, prompt_logprobs=prompt))


def prompt_logprobs(seq: Sequence, start: int, logits: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> None:
    """Extend ``seq.prompt_entries`` with the prompt tokens a prefill chunk's logits score.

    ``logits`` ([n, vocab]) are the chunk's, for prompt positions ``start .. start+n-1``; row ``j``
    predicts the token at ``start+j+1``. The chunk's first token was predicted by the previous
    chunk's last row (``seq.pending_logits``); the prompt's very first token has no logprob.
    """
    top = seq.params.prompt_logprobs or 0
    entries = seq.prompt_entries if seq.prompt_entries is not None else []
    end = start + logits.shape[0]
    rows, targets = logits[:-1], seq.prompt[start + 1 : end]
    if start == 0:
        first = seq.prompt[0]
        # One list of ids decodes to one str (transformers' decode is typed for batches too).
        entries.append(TokenLogprob(first, cast(str, tokenizer.decode([first])), None))
    elif seq.pending_logits is not None:
        rows, targets = torch.cat([seq.pending_logits, rows]), [seq.prompt[start], *targets]
    if targets:
        entries.extend(token_logprobs(rows, targets, [top] * len(targets), tokenizer))
    seq.prompt_entries = entries
    seq.pending_logits = logits[-1:].clone()
