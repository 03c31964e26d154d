"""Per-request decoding rules: sampling parameters, next-token choice, logprobs, stop strings.

Everything here works on one request at a time, so a request's output never depends on which
other requests share its batch: a seeded request owns its ``torch.Generator``, and the text
tracker sees only its own tokens. The engine (``engine.py``) applies these rules row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives to report per token; None = no logprobs

    def __post_init__(self) -> None:
        # Accept a list (as the HTTP layer passes it) but store a tuple so the params stay hashable.
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be within [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be within [0, 20], got {self.logprobs}")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the ``top`` most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "token": self.token, "logprob": self.logprob, "top": list(self.top)}


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator private to one request: seeded means reproducible whatever the batch holds."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits (shape ``[vocab]``)."""
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int, tokenizer: Any) -> TokenLogprob:
    """Log-probability of ``token_id`` under the model's raw distribution (before temperature,
    top-k and top-p), as OpenAI reports it, plus the ``top_n`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[str, float], ...] = ()
    if top_n > 0:
        values, ids = torch.topk(logp, top_n)
        top = tuple((tokenizer.decode([i]), float(v)) for v, i in zip(values.tolist(), ids.tolist()))
    return TokenLogprob(token_id, tokenizer.decode([token_id]), float(logp[token_id].item()), top)


@dataclass
class TextTracker:
    """Turns a growing list of token ids into text deltas, honoring stop strings.

    Decoding the whole completion each step (instead of token by token) keeps multi-byte
    characters split across byte-level tokens intact. Text that could still become a stop string,
    or ends in an incomplete character, is held back until it is decided, so a streamed response
    never shows a stop string or half a character.
    """

    tokenizer: Any
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the completion already handed out
    stopped: bool = False
    _text: str = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text. Sets ``stopped`` when a stop string appears."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._text = text[: min(hits)]
            return self._take(len(self._text))
        self._text = text
        safe = len(text.rstrip("\ufffd"))
        safe -= _stop_prefix_len(text[:safe], self.stop)
        return self._take(safe)

    def flush(self) -> str:
        """Everything not yet handed out; call once when the request finishes."""
        return self._take(len(self._text))

    @property
    def text(self) -> str:
        return self._text

    def _take(self, end: int) -> str:
        delta = self._text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
