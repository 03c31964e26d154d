"""The OpenAI-compatible HTTP app in front of :class:`lmforge.serving.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus). Every error is a JSON body ``{"error": {"message", "type", "param",
"code"}}`` as OpenAI clients expect; a full queue answers 429 (with ``Retry-After``), a server
shutting down 503. A client that disconnects, streaming or not, has its request cancelled at once,
which frees its batch row and KV cache at the engine's next step. What one request may ask is
bounded by ``serving.limits`` (``limits.py``: body bytes, prompt characters and tokens, stop strings,
logprobs); prompts are rendered and tokenized in a worker thread, so a long one never stalls the
event loop (``/health`` and every other stream keep answering). ``n`` choices and ``best_of`` are
``choices.py``'s, the streamed chunks of every choice ``chunks.py``'s.

``launch.py`` binds the socket and runs this app (``python -m lmforge.serving MODEL``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel

from lmforge import __version__
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.api.admin import adapter_held, add_admin_routes
from lmforge.serving.api.choices import Choices, best, candidates, usage_of
from lmforge.serving.api.chunks import chat_chunks, completion_chunks
from lmforge.serving.api.errors import ApiError, install_error_handlers
from lmforge.serving.api.limits import BodyLimit, RequestLimits
from lmforge.serving.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)
from lmforge.serving.api.tools import ToolPlan
from lmforge.serving.engine.engine import Engine
from lmforge.serving.engine.requests import Completion
from lmforge.serving.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Served:
    """What the routes share: the engine, the public model name, the serving config and its limits."""

    engine: Engine
    model_name: str
    cfg: ServingConfig
    limits: RequestLimits

    def check_model(self, name: str | None) -> tuple[str, str | None]:
        """The model name to answer with, and the LoRA adapter to decode with (None: the base)."""
        if name is None or name == self.model_name:
            return self.model_name, None
        if name in self.engine.adapters:
            return name, name
        served = ", ".join(repr(n) for n in [self.model_name, *self.engine.adapters])
        raise ApiError(404, f"model {name!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def budget(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        if max_tokens is not None and max_tokens > self.cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {self.cfg.max_new_tokens}; "
                           "ask for fewer tokens or raise serving.max_new_tokens", param="max_tokens")
        return self.engine.token_budget(len(prompt_ids), max_tokens, self.cfg.max_new_tokens)

    async def tokenize(self, chars: int, param: str, render: Callable[[], list[int]], turns: int = 0) -> list[int]:
        """``render()``'s prompt ids, computed in a worker thread once the prompt's ``chars`` (and a chat's
        ``turns``) could fit.

        Off the event loop: tokenizing a long prompt takes long enough to stall every other request."""
        self.limits.check_chars(chars, param, turns)
        try:
            ids = await anyio.to_thread.run_sync(render)
        except TemplateError as exc:  # e.g. a template that insists on alternating user/assistant turns
            raise ApiError(400, f"the model's chat template refused these messages: {exc}",
                           param="messages", code="invalid_value") from exc
        self.limits.check_tokens(len(ids), param)
        return ids

    async def constrain(self, params: SamplingParams) -> None:
        """Compile ``params.response_format`` in a worker thread (a new schema takes milliseconds to
        seconds), refusing a bad one with a 400; the engine then finds the grammar cached."""
        if params.response_format is not None:
            await anyio.to_thread.run_sync(self.engine.grammar_for, params)


def create_app(engine: Engine, model_name: str, cfg: ServingConfig,
               api_key: str | Sequence[str] | None = None, release: dict[str, str] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``api_key`` (one or several) enables
    Bearer auth on /v1 and /metrics. ``release`` (what the deploy stage serves: registered name,
    version, alias, run id) is reported by /health and as the base model's metadata in /v1/models."""
    if model_name in engine.adapters:
        raise ServingError(f"the adapter name {model_name!r} is also the base model's served name",
                           "rename the adapter (--adapter NAME=DIR) or the model (--model-name)")
    errors: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)}
    app = FastAPI(title="lmforge inference server", version=__version__, responses=errors)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes)
    created = int(time.time())
    keys = [api_key] if isinstance(api_key, str) else [k for k in (api_key or []) if k]

    async def authorize(authorization: str | None = Header(None)) -> None:
        if not keys:
            return
        # The scheme is case-insensitive (RFC 9110 section 11.1): "bearer KEY" is as good as "Bearer KEY".
        scheme, _, token = (authorization or "").strip().partition(" ")
        sent = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare_digest against every key, without stopping early, so timing says nothing about which.
        if not any([hmac.compare_digest(sent, key.encode()) for key in keys]):
            raise ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        if engine.lost is not None:  # a supervisor (compose, Serve, a load balancer) restarts or routes around it
            raise ApiError(503, f"the engine cannot serve: {engine.lost.cause}; {engine.lost.fix}", code="engine_lost")
        served = {"version": release.get("version", ""), "release": release} if release else {}
        return {"status": "ok", "model": model_name, **served}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> Response:
        exposition = getattr(engine.metrics, "exposition", None)
        if exposition is None:
            raise ApiError(404, "metrics are not collected by this server", code="metrics_off")
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        cards = [ModelCard(id=model_name, created=created, max_model_len=engine.context_window, metadata=release)]
        for adapter in engine.adapters:  # served LoRA adapters (serving.adapters), each over the base
            cards.append(ModelCard(id=adapter, created=created, max_model_len=engine.context_window, parent=model_name))
        return ModelList(data=cards)

    served = _Served(engine, model_name, cfg, RequestLimits(cfg.limits, engine.context_window))
    _add_completions(app, served, authorize)
    _add_chat(app, served, authorize)
    add_admin_routes(app, engine, model_name, cfg)  # LoRA adapters loaded while serving (api/admin.py)
    return app


def _add_completions(app: FastAPI, served: _Served, authorize) -> None:
    engine = served.engine

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | Response:
        model_name, adapter = served.check_model(body.model)
        served.limits.check_sampling(body.stops, body.logprobs, "logprobs")
        served.limits.check_choices(body.n, body.best_of)
        count = candidates(body.n, body.best_of, body.stream)  # sequences to generate (api/choices.py)
        text = body.prompt_text
        prompt_ids = await served.tokenize(len(text), "prompt", lambda: engine.encode(text))
        echo = body.prompt_text if body.echo else ""
        max_tokens = served.budget(prompt_ids, body.max_tokens)
        rid = new_id("cmpl")
        if max_tokens == 0 and body.logprobs is None:  # echo alone: nothing to compute
            echoed = [CompletionChoice(index=i, text=echo, finish_reason="length") for i in range(body.n)]
            return CompletionResponse(id=rid, model=model_name, choices=echoed, usage=Usage.of(len(prompt_ids), 0))
        # best_of ranks candidates by their sampled tokens' logprobs: recorded even when not asked for.
        wanted = body.logprobs if body.logprobs is not None or count == body.n else 0
        params = body.sampling(max_tokens, wanted, body.prompt_logprobs)
        await served.constrain(params)
        async with adapter_held(engine, adapter):  # its weights in CPU memory until queued (adapters/runtime.py)
            group = Choices.submit(engine, prompt_ids, params, adapter, count, streamed=body.stream)
        if body.stream:
            chunks = completion_chunks(group, rid, model_name, body.logprobs is not None, body.include_usage, echo)
            return _sse(chunks, group)
        results = await _result_unless_gone(group, request)
        choices = []
        for i, result in enumerate(best(results, body.n) if count > body.n else results):
            logprobs = None
            if body.logprobs is not None:
                logprobs = CompletionLogprobs.of((result.prompt_logprobs or ()) + (result.logprobs or ()))
            choices.append(CompletionChoice(index=i, text=echo + result.text, finish_reason=result.finish_reason,
                                            logprobs=logprobs))
        return CompletionResponse(id=rid, model=model_name, choices=choices, usage=usage_of(results))


def _add_chat(app: FastAPI, served: _Served, authorize) -> None:
    engine = served.engine

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | Response:
        model_name, adapter = served.check_model(body.model)
        served.limits.check_sampling(body.stops, body.top_logprobs, "top_logprobs")
        served.limits.check_choices(body.n)
        tools = ToolPlan.of(body, served.cfg.tool_parser)  # tools, tool_choice, the history's calls (api/tools.py)
        messages = [m.as_template_input() for m in body.messages]
        # The template writes any special tokens itself; adding them again would double a BOS.
        prompt_ids = await served.tokenize(sum(m.chars for m in body.messages) + tools.chars, "messages",
                                           lambda: engine.encode(tools.render(engine, messages), add_special_tokens=False),
                                           turns=len(messages))
        params = tools.constrain(body.sampling(served.budget(prompt_ids, body.max_tokens), body.logprobs_n))
        await served.constrain(params)
        calls = [tools.output() for _ in range(body.n)]  # each choice's calls are parsed on their own
        ends = [output.ends_output() if output is not None else None for output in calls]
        async with adapter_held(engine, adapter):
            group = Choices.submit(engine, prompt_ids, params, adapter, body.n, ends, streamed=body.stream)
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(chat_chunks(group, rid, model_name, body.logprobs, body.include_usage, calls), group)
        results = await _result_unless_gone(group, request)
        choices = []
        for i, (result, output) in enumerate(zip(results, calls, strict=True)):
            logprobs = ChatLogprobs.of(result.logprobs) if result.logprobs is not None else None
            message = output.message(result.text) if output is not None else AssistantMessage(content=result.text)
            finish = output.finish_reason(result.finish_reason) if output is not None else result.finish_reason
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=logprobs))
        return ChatCompletionResponse(id=rid, model=model_name, choices=choices, usage=usage_of(results))


async def _result_unless_gone(group: Choices, request: Request) -> list[Completion]:
    """The request's results; if the client disconnects first, the request is cancelled at once."""
    task = asyncio.ensure_future(group.results())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                group.cancel()
                raise ApiError(499, "the client closed the connection", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


class _EventStream(StreamingResponse):
    """A streaming response that watches for the client going away while it waits for tokens.

    Starlette (ASGI spec 2.4) notices a disconnect only when a write fails, i.e. at the next token;
    a request still waiting in the queue writes nothing, so it would hold its place until admitted.
    """

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                with suppress(OSError):  # the client is gone; the body generator's finally cancels the request
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _sse(chunks: AsyncIterator[BaseModel], group: Choices) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as exc:
            log.exception("stream failed")
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            group.cancel()  # also runs when the client disconnects mid-stream
        yield "data: [DONE]\n\n"

    return _EventStream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
