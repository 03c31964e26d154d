"""The inference engine: loads a model and decodes requests with continuous batching.

One background thread owns the model and runs steps (``engine/steps.py``). A step is a prefill round
and a decode round, each schedule -> execute -> update: the scheduler (``engine/scheduler.py``) says
which sequences run (admission while the batch has a free row and the KV cache can take the request,
dropping requests whose client went away, prompt chunks within ``serving.scheduler.max_prefill_tokens``,
preemption when the cache runs short); the step runs them on the engine's backend (``backends/``: the
paged one, our Llama runner with a paged KV cache and CUDA graphs, or the HF one for every other
causal LM), chooses the next tokens (``engine/sampling.py``), and hands them back to the scheduler,
which sends the text and finishes the done sequences. Requests join and leave the batch at every step.
The waiting queue is bounded (``serving.scheduler.max_queue``): beyond it :meth:`Engine.submit` raises
:class:`EngineBusy` (HTTP 429), and while shutting down it refuses with 503.

Callers use :meth:`Engine.stream` (async iterator of :class:`Delta`), :meth:`Engine.complete`
(async, one :class:`Completion`) or :meth:`Engine.generate` (blocking, for scripts and tests).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.config.base import updated
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.runtime import cpu_count
from lmforge.model.chat import render_chat
from lmforge.serving.backends.base import BackendLost
from lmforge.serving.backends.choose import make_backend
from lmforge.serving.engine.errors import EngineBusy, RequestError
from lmforge.serving.engine.metrics import EngineMetrics, NullMetrics
from lmforge.serving.engine.requests import (
    Completion,
    CompletionCollector,
    Delta,
    GenerationStream,
    Request,
    slot_of,
    token_budget,
)
from lmforge.serving.engine.sampling import SamplingParams, TokenLogprob
from lmforge.serving.engine.scheduler import Scheduler
from lmforge.serving.engine.speculative import make_speculator
from lmforge.serving.engine.steps import Steps
from lmforge.serving.engine.structured import Grammars, GrammarState
from lmforge.serving.model.loading import eos_ids, load_model
from lmforge.serving.model.types import ServedModel

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase
    from xgrammar import CompiledGrammar

log = logging.getLogger(__name__)

# cuDNN attention builds (and caches per thread) a graph for every new query/key shape: ~10 ms each
# on an H200, and the HF backend makes a new key length every step. The other backends need no build.
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

__all__ = ["Completion", "Delta", "Engine", "EngineBusy", "GenerationStream", "RequestError", "SamplingParams",
           "TokenLogprob"]

# Below this width a CPU matmul takes microseconds, and waking another OpenMP thread for it costs
# ~100 us when the process has more OpenMP threads than cores (as it does once a second thread, the
# engine's, runs torch): measured 2x more tokens/s for the demo model with one thread (RESULTS.md).
SMALL_HIDDEN = 1024


def cpu_threads(cfg: ServingConfig, model_config: PreTrainedConfig) -> int:
    """torch threads for the engine thread on a CPU: the configured count, else by model width."""
    if cfg.runtime.cpu_threads:
        return cfg.runtime.cpu_threads
    return 1 if getattr(model_config, "hidden_size", SMALL_HIDDEN) < SMALL_HIDDEN else cpu_count()


class Engine:
    """A loaded model plus the thread that batches and decodes requests for it."""

    def __init__(self, model: ServedModel, tokenizer: PreTrainedTokenizerBase, cfg: ServingConfig | None = None, *,
                 max_batch_size: int | None = None, metrics: EngineMetrics | NullMetrics | None = None) -> None:
        cfg = cfg or ServingConfig()
        if max_batch_size is not None:
            cfg = updated(cfg, scheduler={"max_batch_size": max_batch_size})
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.max_batch_size = cfg.scheduler.max_batch_size
        window = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        self.context_window = min(window, cfg.scheduler.max_model_len or window)
        self.eos_ids = eos_ids(model, tokenizer)
        # An nn.Embedding (torch types its attributes Tensor | Module), or OnnxCausalLM's stand-in.
        self.vocab_size = cast(int, model.get_input_embeddings().num_embeddings)
        self.backend = make_backend(model, cfg, self.context_window)
        try:
            self._start(model, tokenizer, cfg, metrics)
        except BaseException:
            self.backend.close()  # no engine thread will: stop the tensor-parallel workers here
            raise

    def _start(self, model: ServedModel, tokenizer: PreTrainedTokenizerBase, cfg: ServingConfig,
               metrics: EngineMetrics | NullMetrics | None) -> None:
        """Everything over the backend (grammars, speculator, scheduler, steps), then the engine thread."""
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_ids)  # response_format (structured.py)
        self.adapters = self.backend.adapter_slots  # LoRA name -> slot
        self.metrics = metrics or NullMetrics()
        self.metrics.bind(lambda: self.queue_depth, lambda: self.active, lambda: self.cache_usage)
        self.speculator = make_speculator(  # serving.speculative (engine/speculative.py); None when off
            cfg, self.backend, model, tokenizer, self.context_window, self.metrics)
        self._cv = threading.Condition()
        self.scheduler = Scheduler(self.backend, tokenizer, self.eos_ids, max_batch_size=cfg.scheduler.max_batch_size,
                                   max_prefill_tokens=cfg.scheduler.max_prefill_tokens, metrics=self.metrics,
                                   lock=self._cv)
        self._closed = False
        self._draining = False
        self._lost: BackendLost | None = None  # set by the engine thread when a step lost the backend
        # Counters for benchmarks and tests: forward passes and the most rows decoded together.
        self.stats = {"prefills": 0, "merges": 0, "decode_steps": 0, "peak_batch": 0, "launched_ahead": 0}
        self.steps = Steps(self.scheduler, self.backend, tokenizer, self.speculator, cfg.runtime.overlap_decode,
                           self.stats)
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @classmethod
    def load(cls, model_dir: Path, device: str | None = None, max_batch_size: int | None = None,
             cfg: ServingConfig | None = None, metrics: EngineMetrics | NullMetrics | None = None) -> Engine:
        """Load a transformers causal-LM directory (safetensors only, no remote code) and its tokenizer.

        ``device`` (else ``cfg.runtime.device``) defaults to CUDA when present; weights are bf16 on CUDA and
        float32 on CPU; ``cfg.runtime.quantization`` is applied at load.
        """
        cfg = cfg or ServingConfig()
        model, tokenizer = load_model(Path(model_dir), device or cfg.runtime.device, cfg.runtime.quantization)
        return cls(model, tokenizer, cfg, max_batch_size=max_batch_size, metrics=metrics)

    # ------------------------------------------------------------ introspection (metrics, tests)

    @property
    def lost(self) -> BackendLost | None:
        """Why the engine can serve nothing any more (a tensor-parallel worker died: /health answers 503), else None."""
        return self._lost or self.backend.lost()

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def active(self) -> int:
        return self.scheduler.active

    @property
    def cache_usage(self) -> float:
        return self.backend.cache_usage

    # ------------------------------------------------------------ text helpers

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt``; an empty prompt becomes the BOS (or EOS) token so there is a first step."""
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else min(self.eos_ids, default=0)]
        return ids

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for a chat (and the ``tools`` it may call), rendered by the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template", "use /v1/completions with a "
                               "formatted prompt, or save the tokenizer with a chat_template", param="messages")
        # The one rendering function training and evaluation use, with the template saved with the model.
        return render_chat(self.tokenizer, messages, tools, add_generation_prompt=True)

    def token_budget(self, prompt_tokens: int, max_tokens: int | None, default: int) -> int:
        """The max_tokens to use: the request's (checked against the context window) or the default
        shrunk to fit. Raises :class:`RequestError` naming both numbers when they cannot fit."""
        return token_budget(self.context_window, prompt_tokens, max_tokens, default, self.backend.virtual_tokens)

    # ------------------------------------------------------------ public generation API

    def stream(self, prompt: str | Seq[int], params: SamplingParams, adapter: str | None = None) -> GenerationStream:
        """Queue a request and return its async stream of deltas. Call from a running event loop.
        ``adapter``: a served LoRA adapter's name (``serving.adapters``), None for the base."""
        return GenerationStream(functools.partial(self.submit, adapter=adapter), self._ids(prompt), params)

    async def complete(self, prompt: str | Seq[int], params: SamplingParams, adapter: str | None = None) -> Completion:
        return await self.stream(prompt, params, adapter).result()

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 adapters: Seq[str | None] | None = None) -> list[Completion]:
        """Blocking: submit all prompts at once (so they batch together) and wait for every result.
        Not bounded by ``max_queue``: the caller chose how much work to hand over. ``adapters``: per
        prompt, a served LoRA adapter's name or None for the base."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        ids = [self._ids(prompt) for prompt in prompts]
        for prompt_ids, p in zip(ids, per_prompt, strict=True):
            self.check(prompt_ids, p)  # all or nothing: no orphaned requests if one is refused
        for name in names:
            slot_of(self.adapters, name)
        collector = CompletionCollector(len(prompts))
        for i, (prompt_ids, p) in enumerate(zip(ids, per_prompt)):
            self.submit(prompt_ids, p, collector.sink(i), bounded=False, adapter=names[i])
        return collector.wait()

    @contextlib.contextmanager
    def admission_held(self) -> Iterator[None]:
        """Requests submitted inside the block are admitted together, in submission order.

        The engine thread waits on the same (re-entrant) lock, so it takes the whole set at its next
        step: a run's schedule then does not depend on thread timing (benchmarks and checks use it).
        """
        with self._cv:
            yield

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Delta | BaseException], None], bounded: bool = True,
               adapter: str | None = None) -> Request:
        """Low level: queue a request; ``sink`` receives deltas (or an exception) on the engine thread.
        Raises :class:`EngineBusy` when the queue is full or the engine is shutting down."""
        self.check(prompt_ids, params)
        grammar = self.grammar_state(params)
        with self._cv:  # the adapter's id is looked up under the lock that guards loads and unloads
            request = Request(list(prompt_ids), params, sink, adapter=slot_of(self.adapters, adapter),
                              grammar=grammar)
            if self.lost is not None:
                self.metrics.rejected(503)
                raise EngineBusy(f"the server cannot serve: {self.lost.cause}", self.lost.fix, status=503)
            if self._closed or self._draining:
                self.metrics.rejected(503)
                raise EngineBusy("the server is shutting down", "retry against a running server", status=503)
            # make room: drop those whose client left
            if bounded and len(self.scheduler.waiting) >= self.cfg.scheduler.max_queue:
                self.scheduler.forget_cancelled()
            if bounded and len(self.scheduler.waiting) >= self.cfg.scheduler.max_queue:
                self.metrics.rejected(429)
                raise EngineBusy(f"the server is at capacity ({self.active} running, {self.queue_depth} waiting)",
                                 "retry after a short wait (see Retry-After), or raise serving.scheduler.max_queue",
                                 status=429)
            self.scheduler.add(request)
            self._cv.notify()
        return request

    def check(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise :class:`RequestError` for a request the engine would refuse."""
        # A bad id would fail the whole shared batch inside the forward pass; refuse it here instead.
        if not prompt_ids or not all(0 <= i < self.vocab_size for i in prompt_ids):
            raise RequestError(f"the prompt must be 1 or more token ids in [0, {self.vocab_size})",
                               "send a non-empty prompt of valid token ids", param="prompt")
        self.token_budget(len(prompt_ids), params.max_tokens, params.max_tokens)
        self.grammar_for(params)
        need = len(prompt_ids) + params.max_tokens
        if not self.backend.fits_ever(need):
            need += self.backend.virtual_tokens  # a prompt-learning adapter's, before the prompt
            raise RequestError(f"the prompt and max_tokens need {need} tokens of KV cache, more than this "
                               "server's cache holds for one request",
                               "ask for fewer tokens, or raise serving.kv_cache.memory_mb", param="max_tokens",
                               code="kv_cache_too_small")

    def grammar_for(self, params: SamplingParams) -> CompiledGrammar | None:
        """``params.response_format`` compiled for this model (cached, with its first mask), None when
        unconstrained; :class:`RequestError` when it cannot be. Slow the first time: call it off an event loop."""
        if params.response_format is None:
            return None
        self.grammars.first_mask(params.response_format)
        return self.grammars.compile(params.response_format)

    def grammar_state(self, params: SamplingParams) -> GrammarState | None:
        """A new request's grammar state (None when unconstrained), its first mask copied from the cache: a
        matcher and a few kilobytes, cheap on any thread (also under the admission lock)."""
        fmt = params.response_format
        if fmt is None:
            return None
        return GrammarState.started(self.grammars.compile(fmt), self.grammars.first_mask(fmt))

    def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop the engine thread. New requests are refused at once; running and queued ones get up to
        ``drain_timeout_s`` to finish, then receive a ServingError."""
        with self._cv:
            self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self.scheduler.has_work() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _ids(self, prompt: str | Seq[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        if self.device.type == "cpu":
            # OpenMP thread counts are per calling thread: this sets the engine thread's alone.
            torch.set_num_threads(cpu_threads(self.cfg, self.model.config))
        while self._wait_for_work():
            try:
                with torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS):
                    self.steps.step()
            except Exception as exc:
                # A collective can fail before the backend names the dead worker: ask it.
                lost = exc if isinstance(exc, BackendLost) else self.backend.lost()
                if lost is None:
                    log.exception("engine step failed; failing %d request(s)", self.scheduler.active)
                    self.scheduler.fail_active(exc)
                    self.steps.reset()
                    continue
                log.error("the engine lost its backend, failing every request: %s", lost)  # no later step can run
                with self._cv:
                    self._lost = lost
                self.scheduler.close(lost)
                break
        self.scheduler.close(ServingError("the engine shut down before the request finished",
                                          "retry against a running server"))
        self.backend.close()  # tensor-parallel workers stop once no step can need them

    def _wait_for_work(self) -> bool:
        with self._cv:
            while not self._closed and not self.scheduler.has_work():
                self._cv.wait()
            return not self._closed


# Engines still running at interpreter exit are closed first: a daemon thread killed inside a
# torch op can abort the process ("terminate called without an active exception").
_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()


atexit.register(_close_live_engines)
