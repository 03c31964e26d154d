"""The inference engine: loads a model directory and decodes requests with continuous batching.

One background thread owns the model. It keeps a running batch (``batch.DecodeBatch``) and, at
every step boundary, admits waiting requests (up to ``max_batch_size`` rows): their prompts are
prefilled together with left padding, then merged into the running batch, and every row advances
one token per forward pass. A finished row leaves at the next boundary, so short requests never
wait for long ones. Decoding is our own loop over the model's KV cache (no ``generate()``), which
is what a paged KV cache and CUDA graphs later replace without changing this interface.

Callers use :meth:`Engine.stream` (async iterator of :class:`Delta`), :meth:`Engine.complete`
(async, one :class:`Completion`) or :meth:`Engine.generate` (blocking, for scripts and tests).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.errors import ServingError
from lmforge.serving.batch import DecodeBatch, check_cache_support
from lmforge.serving.requests import Completion, Delta, GenerationStream, Request, RequestError, send
from lmforge.serving.sampling import (
    SamplingParams,
    TextTracker,
    TokenLogprob,
    choose_token,
    make_generator,
    token_logprob,
)

log = logging.getLogger(__name__)

# cuDNN attention builds (and caches per thread) a graph for every new query/key shape: ~10 ms each
# on an H200, and decoding makes a new key length every step. The other backends need no build.
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

__all__ = ["Completion", "Delta", "Engine", "GenerationStream", "RequestError", "SamplingParams", "TokenLogprob"]


@dataclass
class _Row:
    """Decoding state of one admitted request."""

    request: Request
    tracker: TextTracker
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    next_token: int = -1


class Engine:
    """A loaded model plus the thread that batches and decodes requests for it."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 8) -> None:
        check_cache_support(model)
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.max_batch_size = max_batch_size
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        # Counters for benchmarks and tests: forward passes and the most rows decoded together.
        self.stats = {"prefills": 0, "merges": 0, "decode_steps": 0, "peak_batch": 0}
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @classmethod
    def load(cls, model_dir: Path, device: str | None = None, max_batch_size: int = 8) -> "Engine":
        """Load a transformers causal-LM directory (safetensors only, no remote code) and its tokenizer.

        ``device`` defaults to CUDA when present; weights are bf16 on CUDA and float32 on CPU.
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ServingError(
                f"{model_dir} is not a model directory (no config.json there)",
                "pass a directory written by training (config.json, model.safetensors, tokenizer files) "
                "or a registry URI such as models:/NAME@champion",
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise ServingError(
                f"cannot load the model in {model_dir}: {exc}",
                "check that the directory holds config.json, model.safetensors and the tokenizer files",
            ) from exc
        model.to(device).eval()
        return cls(model, tokenizer, max_batch_size=max_batch_size)

    # ------------------------------------------------------------ text helpers

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt``; an empty prompt becomes the BOS (or EOS) token so there is a first step."""
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else min(self.eos_ids, default=self._pad_id)]
        return ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat, rendered by the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "this model's tokenizer has no chat template",
                "use /v1/completions with a formatted prompt, or save the tokenizer with a chat_template",
                param="messages",
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def token_budget(self, prompt_tokens: int, max_tokens: int | None, default: int) -> int:
        """The max_tokens to use: the request's (checked against the context window) or the default
        shrunk to fit. Raises :class:`RequestError` naming both numbers when they cannot fit."""
        room = self.context_window - prompt_tokens
        if max_tokens is None and room >= 1:
            return min(default, room)
        if max_tokens is None or max_tokens > room:
            asked = default if max_tokens is None else max_tokens
            raise RequestError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {asked}: "
                f"{prompt_tokens + asked} exceeds the model's context window of {self.context_window} tokens",
                "shorten the prompt or lower max_tokens",
                param="max_tokens" if max_tokens is not None else "prompt",
                code="context_length_exceeded",
            )
        return max_tokens

    # ------------------------------------------------------------ public generation API

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> "GenerationStream":
        """Queue a request and return its async stream of deltas. Call from a running event loop."""
        return GenerationStream(self.submit, self._ids(prompt), params)

    async def complete(self, prompt: str | Sequence[int], params: SamplingParams) -> Completion:
        return await self.stream(prompt, params).result()

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Blocking: submit all prompts at once (so they batch together) and wait for every result."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        results: list[Completion | BaseException | None] = [None] * len(prompts)
        finished = threading.Semaphore(0)

        def sink_for(i: int) -> Callable[[Delta | BaseException], None]:
            def sink(item: Delta | BaseException) -> None:
                if isinstance(item, BaseException) or item.completion is not None:
                    results[i] = item if isinstance(item, BaseException) else item.completion
                    finished.release()

            return sink

        ids = [self._ids(prompt) for prompt in prompts]
        for prompt_ids, p in zip(ids, per_prompt, strict=True):
            self.check(prompt_ids, p)  # all or nothing: no orphaned requests if one is refused
        for i, (prompt_ids, p) in enumerate(zip(ids, per_prompt)):
            self.submit(prompt_ids, p, sink_for(i))
        for _ in prompts:
            finished.acquire()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Delta | BaseException], None]
    ) -> Request:
        """Low level: queue a request; ``sink`` receives deltas (or an exception) on the engine thread."""
        self.check(prompt_ids, params)
        request = Request(list(prompt_ids), params, sink)
        with self._cv:
            if self._closed:
                raise ServingError("the engine is closed", "create a new Engine (the server was shutting down)")
            self._waiting.append(request)
            self._cv.notify()
        return request

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`RequestError` for a request the engine would refuse."""
        vocab = self.model.get_input_embeddings().num_embeddings
        # A bad id would fail the whole shared batch inside the forward pass; refuse it here instead.
        if not prompt_ids or not all(0 <= i < vocab for i in prompt_ids):
            raise RequestError(f"the prompt must be 1 or more token ids in [0, {vocab})",
                               "send a non-empty prompt of valid token ids", param="prompt")
        self.token_budget(len(prompt_ids), params.max_tokens, params.max_tokens)

    def close(self) -> None:
        """Stop the engine thread; queued and running requests receive a ServingError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        rows: list[_Row] = []
        batch: DecodeBatch | None = None
        while True:
            new = self._admit(block=not rows, room=self.max_batch_size - len(rows))
            if new is None:
                break
            try:
                with torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS):
                    batch, rows = self._step(batch, rows, new)
            except Exception as exc:  # noqa: BLE001 - handed to every affected request, then logged
                log.exception("engine step failed; failing %d request(s)", len(rows) + len(new))
                for request in [r.request for r in rows] + new:
                    send(request, exc)
                batch, rows = None, []
        closed = ServingError("the engine shut down before the request finished", "retry against a running server")
        for request in [r.request for r in rows] + list(self._waiting):
            send(request, closed)

    def _admit(self, block: bool, room: int) -> list[Request] | None:
        """Waiting requests that fit in the batch; None once the engine is closed."""
        with self._cv:
            while block and not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            taken: list[Request] = []
            while self._waiting and len(taken) < room:
                request = self._waiting.popleft()
                if not request.cancelled.is_set():
                    taken.append(request)
            return taken

    def _step(
        self, batch: DecodeBatch | None, rows: list[_Row], new: list[Request]
    ) -> tuple[DecodeBatch | None, list[_Row]]:
        """One step boundary: prefill and merge ``new``, then decode one token for every row."""
        if new:
            fresh, logits = DecodeBatch.prefill(self.model, [r.prompt_ids for r in new], self._pad_id)
            self.stats["prefills"] += 1
            fresh, fresh_rows = self._advance(fresh, [self._new_row(r) for r in new], logits)
            if batch is None:
                batch, rows = fresh, fresh_rows
            elif fresh is not None:
                batch.merge(fresh)
                rows = rows + fresh_rows
                self.stats["merges"] += 1
        live = [i for i, r in enumerate(rows) if not r.request.cancelled.is_set()]
        if batch is None or not live:
            return None, []
        if len(live) < len(rows):
            batch.keep(live)
            rows = [rows[i] for i in live]
        # Every row now holds a chosen but unfed token (prefilled rows included): feed them together.
        tokens = torch.tensor([r.next_token for r in rows], dtype=torch.long, device=self.device)
        logits = batch.decode(self.model, tokens)
        self.stats["decode_steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(rows))
        return self._advance(batch, rows, logits)

    def _advance(
        self, batch: DecodeBatch, rows: list[_Row], logits: torch.Tensor
    ) -> tuple[DecodeBatch | None, list[_Row]]:
        """Choose each row's next token, report it, and drop the rows that finished."""
        keep = [i for i, row in enumerate(rows) if not self._choose(row, logits[i])]
        if not keep:
            return None, []
        if len(keep) < len(rows):
            batch.keep(keep)
        return batch, [rows[i] for i in keep]

    def _new_row(self, request: Request) -> _Row:
        params = request.params
        return _Row(request, TextTracker(self.tokenizer, params.stop), make_generator(self.device, params.seed))

    def _choose(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample one token for ``row`` and send its delta; True when the row is finished."""
        params = row.request.params
        token = choose_token(logits, params, row.generator)
        row.token_ids.append(token)
        row.next_token = token
        if params.logprobs is not None:
            entry = token_logprob(logits, token, params.logprobs, self.tokenizer)
            row.logprobs.append(entry)
            row.unsent_logprobs.append(entry)
        finish: str | None = None
        if token in self.eos_ids:
            text, finish = row.tracker.flush(), "stop"
        else:
            text = row.tracker.add(token)
            if row.tracker.stopped:
                finish = "stop"
            elif len(row.token_ids) >= params.max_tokens:
                text, finish = text + row.tracker.flush(), "length"
        if not text and finish is None:
            return False  # held back (incomplete character or possible stop string)
        completion = None
        if finish is not None:
            completion = Completion(
                text=row.tracker.text,
                token_ids=tuple(row.token_ids),
                finish_reason=finish,
                prompt_tokens=len(row.request.prompt_ids),
                completion_tokens=len(row.token_ids),
                logprobs=tuple(row.logprobs) if params.logprobs is not None else None,
            )
        delta = Delta(text, tuple(row.unsent_logprobs), completion)
        row.unsent_logprobs.clear()
        send(row.request, delta)
        return finish is not None or row.request.cancelled.is_set()


# Engines still running at interpreter exit are closed first: a daemon thread killed inside a
# torch op can abort the process ("terminate called without an active exception").
_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()
atexit.register(lambda: [engine.close() for engine in list(_LIVE)])


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
