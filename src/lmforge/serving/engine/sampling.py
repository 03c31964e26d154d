"""Decoding rules: sampling parameters, batched next-token choice, logprobs, incremental text.

Tokens for a whole step are chosen at once (:func:`choose_tokens`: one argmax, or one sort of the
sampled rows) so the engine syncs with the device once per step, not once per row. A request's
output still never depends on which other requests share its batch: each request draws its
uniform numbers from its own ``random.Random`` (seeded when the request gives a seed), and the
choice is the inverse CDF of its own filtered distribution at that number. The text tracker sees
only its own tokens and decodes incrementally (a few tokens per step, not the whole completion).
"""

from __future__ import annotations

import functools
import random
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from lmforge.serving.model.transfer import to_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ResponseFormat:
    """A request's output constraint (OpenAI's ``response_format``): any JSON object, or JSON that
    follows ``schema`` (JSON text); or a ``structural_tag`` (xgrammar's JSON form, in ``schema``), as a
    forced tool call is constrained. ``engine/structured.py`` compiles it into a grammar."""

    type: Literal["json_object", "json_schema", "structural_tag"]
    schema: str | None = None  # JSON text of the schema (json_schema) or of the structural tag


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
    prompt_logprobs: int | None = None  # likewise for the prompt's tokens (the completions API's echo)
    ignore_eos: bool = False  # keep going past EOS until max_tokens (benchmarks)
    response_format: ResponseFormat | None = None  # constrained decoding (engine/structured.py)

    def __post_init__(self) -> None:
        # Accept a list (as the HTTP layer passes it) but store a tuple so the params stay hashable.
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(f"max_tokens must be at least 1 (0 only to score a prompt), got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be within [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.response_format is not None and (self.stop or self.ignore_eos):
            # A stop string could cut the JSON short, and the grammar ends the output with EOS.
            raise ValueError("response_format cannot be combined with stop strings or ignore_eos")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be within [0, 20], got {value}")


@dataclass(frozen=True)
class TokenLogprob:
    """One token, its log-probability (None for a prompt's first token) and the top alternatives."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "token": self.token, "logprob": self.logprob, "top": list(self.top)}


def make_rng(seed: int | None) -> random.Random:
    """A request's private source of uniforms: seeded means reproducible whatever the batch holds."""
    return random.Random(seed) if seed is not None else random.Random()


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[random.Random]) -> list[int]:
    """The next token of every row of ``logits`` ([rows, vocab]) under that row's parameters."""
    return pick_tokens(logits, params, rngs).tolist()


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[random.Random]) -> torch.Tensor:
    """:func:`choose_tokens` left on the logits' device ([rows] int64), queued without waiting for
    the device: the engine launches the next decode step from them before they reach the host."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(sampled) == len(params):
        return _sample(logits, list(params), [rng.random() for rng in rngs])
    if sampled:
        index = to_device(sampled, torch.long, logits.device)
        picks = _sample(logits.index_select(0, index), [params[i] for i in sampled], [rngs[i].random() for i in sampled])
        tokens.index_copy_(0, index, picks)
    return tokens


def _sample(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    scores, order = _filtered_scores(logits, params)
    cdf = torch.softmax(scores, dim=-1).cumsum(-1)
    u = to_device(uniforms, cdf.dtype, logits.device)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u).clamp(max=logits.shape[-1] - 1)
    return order.gather(1, pick).squeeze(1)


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each row of ``logits`` is sampled from under its parameters ([rows, vocab], float32,
    vocabulary order): what :func:`choose_tokens` draws from, a point mass on the argmax for greedy rows.
    Speculative decoding's rejection sampling (``engine/speculative.py``) compares these."""
    probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        probs[greedy] = probs[greedy].scatter(1, logits[greedy].argmax(dim=-1, keepdim=True), 1.0)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        scores, order = _filtered_scores(logits[sampled], [params[i] for i in sampled])
        probs[sampled] = probs[sampled].scatter(1, order, torch.softmax(scores, dim=-1))
    return probs


def _filtered_scores(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled scores sorted in descending order, -inf beyond each row's top-k and top-p, and
    the sort order (vocabulary ids)."""
    device = logits.device
    vocab = logits.shape[-1]
    temps = to_device([p.temperature for p in params], torch.float32, device)[:, None]
    scores, order = torch.sort(logits.float() / temps, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device)[:, None]
    scores = scores.masked_fill(ranks >= top_k, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    top_p = to_device([p.top_p for p in params], torch.float32, device)[:, None]
    # Drop a token once the mass before it already reaches top_p; the first token always stays.
    scores = scores.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))
    return scores, order


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top_n: Sequence[int],
                   tokenizer: PreTrainedTokenizerBase) -> list[TokenLogprob]:
    """Log-probability of each row's ``token_ids[i]`` under the model's raw distribution (before
    temperature, top-k and top-p, as OpenAI reports it), plus that row's ``top_n[i]`` likeliest."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), device=logits.device)
    chosen = logp.gather(1, ids[:, None]).squeeze(1).tolist()
    widest = max(top_n, default=0)
    tops: list[list[tuple[float, int]]] = [[] for _ in token_ids]
    if widest > 0:
        values, indices = torch.topk(logp, widest, dim=-1)
        tops = [list(zip(v, i)) for v, i in zip(values.tolist(), indices.tolist())]
    # One list of ids decodes to one str (transformers' decode is typed for batches too).
    return [
        TokenLogprob(tid, cast(str, tokenizer.decode([tid])), lp,
                     tuple((cast(str, tokenizer.decode([i])), v) for v, i in top[:n]))
        for tid, lp, top, n in zip(token_ids, chosen, tops, top_n)
    ]


class TextTracker:
    """Turns a growing list of token ids into text deltas, honoring stop strings.

    Decoding is incremental: each step decodes only the tokens since the last emitted text plus the
    tokens of that text as context (enough for tokenizers that put spaces between words), and emits
    the text only once it no longer ends in an incomplete character (byte-level tokens can split
    one). Text that could still become a stop string is held back until it is decided, so a stream
    never shows a stop string or half a character. :meth:`defer` appends a token without decoding
    it: a request nobody streams and nothing reads mid-way (no stop strings) is decoded in one go by
    :meth:`flush`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.token_ids: list[int] = []
        self.stopped = False
        self._decoder = token_decoder(tokenizer)
        self._done: list[str] = []  # text handed out (joined only once, by ``text``: no O(n) copy per token)
        self._held = ""  # text decoded but not handed out: an incomplete stop string, or nothing
        self._prefix = 0  # token offsets: context start, and end of the tokens already decoded
        self._read = 0
        self._longest_stop = max((len(s) for s in stop), default=0)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text. Sets ``stopped`` when a stop string appears."""
        self.token_ids.append(token_id)
        new = self._catch_up(final=False)
        if not new:
            return ""
        held = self._held + new
        if self.stop:
            # A stop string can only start in the held text: an earlier start would have been held back.
            search_from = max(0, len(self._held) - self._longest_stop + 1)
            hits = [i for i in (held.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self._held = held[: min(hits)]
                return self._take(len(self._held))
            self._held = held
            return self._take(len(held) - _stop_prefix_len(held, self.stop))
        self._held = held
        return self._take(len(held))

    def defer(self, token_id: int) -> None:
        """Append one token without decoding it; :meth:`flush` decodes every deferred token at once."""
        self.token_ids.append(token_id)

    def _catch_up(self, final: bool) -> str:
        """Decode the tokens not yet decoded; return their text ("" while it ends in an incomplete
        character, unless ``final``)."""
        ids = self.token_ids
        if self._read == len(ids):
            return ""
        context = self._decoder.context(ids, self._prefix, self._read)
        full = self._decoder.decode(ids[self._prefix :])
        if len(full) > len(context) and (final or not full.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(ids)
            return full[len(context) :]
        return ""

    def flush(self) -> str:
        """Everything not yet handed out; call once when the request finishes."""
        if not self.stopped:
            self._held += self._catch_up(final=True)
        return self._take(len(self._held))

    @property
    def text(self) -> str:
        """All text so far: what was handed out, then what is held back."""
        return "".join(self._done) + self._held

    def _take(self, end: int) -> str:
        delta, self._held = self._held[:end], self._held[end:]
        if delta:
            self._done.append(delta)
        return delta


class TokenDecoder:
    """A tokenizer's ``decode`` (special tokens skipped), and the text of each single token, cached:
    an incremental decode's context is most often the one token emitted last, so with the cache a
    generated token costs one call into the tokenizer, not two. Shared by every tracker of a tokenizer
    (:func:`token_decoder`); the cache holds at most one string per vocabulary entry."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        fast = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer: no per-call Python overhead
        if fast is not None:  # a partial, not a lambda: one Python frame less per call
            self.decode: Callable[[list[int]], str] = functools.partial(fast.decode, skip_special_tokens=True)
        else:
            self.decode = lambda ids: cast(str, tokenizer.decode(ids, skip_special_tokens=True,
                                                                 clean_up_tokenization_spaces=False))
        self._empty = self.decode([])
        self._single: dict[int, str] = {}

    def context(self, ids: list[int], start: int, end: int) -> str:
        """The text of ``ids[start:end]``, as :attr:`decode` gives it."""
        if end - start == 1:
            token = ids[start]
            text = self._single.get(token)
            if text is None:
                text = self._single[token] = self.decode([token])
            return text
        return self.decode(ids[start:end]) if end > start else self._empty


# Decoders by tokenizer: an engine's trackers share one (and its cache), dropped with the tokenizer.
_DECODERS: weakref.WeakKeyDictionary[Any, TokenDecoder] = weakref.WeakKeyDictionary()
_DECODERS_LOCK = threading.Lock()  # trackers are made on the engine thread; tests and tools make them anywhere


def token_decoder(tokenizer: PreTrainedTokenizerBase) -> TokenDecoder:
    """The shared :class:`TokenDecoder` of ``tokenizer``."""
    with _DECODERS_LOCK:
        decoder = _DECODERS.get(tokenizer)
        if decoder is None:
            decoder = _DECODERS[tokenizer] = TokenDecoder(tokenizer)
        return decoder


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
