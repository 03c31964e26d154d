"""What the engine and its scheduler ask of a model backend: the :class:`Backend` protocol.

The engine (``engine/engine.py``) runs the steps and the scheduler (``engine/scheduler.py``) decides
who runs; a backend holds the model and its KV cache and runs forward passes. Every backend defines
every member below (a default where it has nothing to offer), so the engine never asks a backend
whether it has one. ``backends/choose.py`` picks the backend for a model: ``paged.PagedBackend``
(our Llama runner over a paged cache, CUDA graphs on GPUs), ``hf.HFBackend`` (the model's own
forward with a dense cache, every other causal LM) or the same HF backend over ONNX Runtime
(``onnx.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.core.errors import ServingError


class BackendLost(ServingError):
    """The backend can run no step any more (a tensor-parallel worker died): the engine fails every request,
    refuses new ones and reports itself unhealthy, so that a supervisor restarts the server."""


@dataclass(frozen=True)
class PrefillItem:
    row: int  # the sequence's backend row (from reserve)
    start: int  # position of the first token in ``ids`` (earlier chunks are already cached)
    ids: list[int]
    all_logits: bool = False  # logits for every token of the chunk (echo's prompt logprobs), else the last


class Backend(Protocol):
    name: str  # "paged", "hf" or "onnx": what served the model (reports, tests)
    chunked_prefill: bool  # False: prefill items must be whole prompts
    overlap: bool  # True: the engine may launch a decode step before handling the previous one's text
    reserves_worst_case: bool  # True: reserve() holds prompt plus max_tokens, so grow() is never needed
    virtual_tokens: int  # a prompt-learning adapter's positions before every prompt (0: none)

    @property
    def adapter_slots(self) -> Mapping[str, int]:
        """Served unmerged LoRA adapters, name -> slot (empty: the base alone)."""
        ...

    def fits_ever(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` (prompt plus max_tokens) could be admitted into an empty cache."""
        ...

    def can_reserve(self, tokens: int, prompt: Sequence[int] = (), adapter: int = 0) -> bool:
        """Whether :meth:`reserve` with the same arguments would succeed now."""
        ...

    def reserve(self, tokens: int, prompt: Sequence[int] = (), adapter: int = 0) -> int:
        """A row for a sequence of up to ``tokens``; its cache holds at least the first prefill chunk.
        ``prompt`` (with LoRA slot ``adapter``): tokens whose cached prefix the row may reuse (prefix
        caching; empty: none), see :meth:`cached_tokens`."""
        ...

    def cached_tokens(self, row: int) -> int:
        """Leading prompt tokens ``row``'s cache holds or is having written by other rows (prefix cache hits,
        :meth:`prefill_waits`): the prefill starts after them. Fixed from ``row``'s first prefill chunk on;
        before it, it may shrink (a row writing them went away). Always fewer than the prompt (0 for a
        backend without prefix caching)."""
        ...

    def prefill_waits(self, row: int) -> Sequence[tuple[int, int]]:
        """(row, prompt tokens) pairs: ``row``'s next prefill chunk may run only in a forward after which each
        such row has prefilled that many tokens (it shares cache blocks they are writing; prefix caching).
        Empty: it may run now (always, for a backend without prefix caching)."""
        ...

    def grow(self, row: int, tokens: int) -> bool:
        """Make ``row``'s cache hold ``tokens`` tokens; False when the cache is short (the scheduler then
        preempts). Called only when ``reserves_worst_case`` is False; otherwise True."""
        ...

    def release(self, row: int) -> None: ...

    def set_adapter(self, row: int, slot: int) -> None:
        """Decode ``row`` with LoRA adapter ``slot`` of ``adapter_slots`` (0: the plain base)."""
        ...

    def prefill(self, items: list[PrefillItem]) -> list[torch.Tensor]:
        """Logits of each item's last token (every token's with ``all_logits``). They may be views of a
        captured graph's output, valid until the backend's next forward: a caller that keeps them copies."""
        ...

    def decode(self, rows: list[int], positions: list[int], tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, vocab]`` after feeding ``tokens[i]`` at ``positions[i]`` of ``rows[i]``. ``tokens`` is a
        device tensor only for a backend with ``overlap`` (the previous step's choice, not yet on the host)."""
        ...

    @property
    def cache_usage(self) -> float: ...

    def lost(self) -> BackendLost | None:
        """Why the backend can run no step any more (a tensor-parallel worker died); None while it can. Any thread
        may ask (``/health``)."""
        ...

    def close(self) -> None:
        """Stop what the backend started beside this process (tensor-parallel workers); the engine thread calls
        it once, after its last step."""
        ...
