"""The OpenAI-compatible HTTP server in front of :class:`lmforge.serving.engine.Engine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models`` and ``GET /health``. Every
error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` as OpenAI clients expect.

Run it with ``python -m lmforge.serving MODEL_DIR`` (see ``__main__.py``) or :func:`run_server`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import __version__
from lmforge.config.stages import ServingConfig
from lmforge.errors import ServingError
from lmforge.serving.engine import Engine, GenerationStream, RequestError
from lmforge.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
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

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as an OpenAI error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type, headers)

    @app.exception_handler(RequestError)
    async def _request(_: Request, exc: RequestError) -> JSONResponse:
        return _error(400, f"{exc.cause}; {exc.fix}", exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return _error(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
        fields = [[str(p) for p in e.get("loc", ()) if p != "body"] for e in errors]
        message = "; ".join(f"{'.'.join(f) or 'body'}: {e.get('msg')}" for f, e in zip(fields, errors))
        param = fields[0][0] if fields and fields[0] else None
        return _error(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), code=str(exc.status_code))


def create_app(engine: Engine, model_name: str, cfg: ServingConfig, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``api_key`` enables Bearer auth on /v1."""
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404)}
    app = FastAPI(title="lmforge inference server", version=__version__, responses=errors)
    _install_error_handlers(app)
    created = int(time.time())

    async def authorize(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        if not authorization or not hmac.compare_digest(authorization.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def budget(prompt_ids: list[int], max_tokens: int | None) -> int:
        if max_tokens is not None and max_tokens > cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {cfg.max_new_tokens}; "
                           "ask for fewer tokens or raise serving.max_new_tokens", param="max_tokens")
        return engine.token_budget(len(prompt_ids), max_tokens, cfg.max_new_tokens)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created, max_model_len=engine.context_window)])

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        check_model(body.model)
        prompt_ids = engine.encode(body.prompt_text)
        params = body.sampling(budget(prompt_ids, body.max_tokens), body.logprobs)
        stream = engine.stream(prompt_ids, params)
        rid = new_id("cmpl")
        if body.stream:
            chunks = _completion_chunks(stream, rid, model_name, body.logprobs is not None, body.include_usage)
            return _sse(chunks, stream)
        result = await stream.result()
        logprobs = CompletionLogprobs.of(result.logprobs) if result.logprobs is not None else None
        choice = CompletionChoice(text=result.text, finish_reason=result.finish_reason, logprobs=logprobs)
        return CompletionResponse(id=rid, model=model_name, choices=[choice],
                                  usage=Usage.of(result.prompt_tokens, result.completion_tokens))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat(body: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        check_model(body.model)
        prompt = engine.render_chat([m.as_template_input() for m in body.messages])
        # The template writes any special tokens itself; adding them again would double a BOS.
        prompt_ids = engine.encode(prompt, add_special_tokens=False)
        params = body.sampling(budget(prompt_ids, body.max_tokens), body.logprobs_n)
        stream = engine.stream(prompt_ids, params)
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(_chat_chunks(stream, rid, model_name, body.logprobs, body.include_usage), stream)
        result = await stream.result()
        logprobs = ChatLogprobs.of(result.logprobs) if result.logprobs is not None else None
        choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason,
                            logprobs=logprobs)
        return ChatCompletionResponse(id=rid, model=model_name, choices=[choice],
                                      usage=Usage.of(result.prompt_tokens, result.completion_tokens))

    return app


async def _completion_chunks(stream: GenerationStream, rid: str, model: str, logprobs: bool,
                             include_usage: bool) -> AsyncIterator[BaseModel]:
    created, offset = int(time.time()), 0
    async for delta in stream:
        lp = CompletionLogprobs.of(delta.logprobs, offset) if logprobs else None
        offset += sum(len(e.token) for e in delta.logprobs)
        choice = CompletionChoice(text=delta.text, finish_reason=delta.finish_reason, logprobs=lp)
        yield CompletionResponse(id=rid, created=created, model=model, choices=[choice])
        if delta.completion is not None and include_usage:
            usage = Usage.of(delta.completion.prompt_tokens, delta.completion.completion_tokens)
            yield CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage)


async def _chat_chunks(stream: GenerationStream, rid: str, model: str, logprobs: bool,
                       include_usage: bool) -> AsyncIterator[BaseModel]:
    created = int(time.time())
    first = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
    yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[first])
    async for delta in stream:
        lp = ChatLogprobs.of(delta.logprobs) if logprobs else None
        choice = ChatChunkChoice(delta=ChatDelta(content=delta.text), finish_reason=delta.finish_reason, logprobs=lp)
        yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])
        if delta.completion is not None and include_usage:
            usage = Usage.of(delta.completion.prompt_tokens, delta.completion.completion_tokens)
            yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)


def _sse(chunks: AsyncIterator[BaseModel], stream: GenerationStream) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band, then log
            log.exception("stream failed")
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            stream.cancel()  # also runs when the client disconnects mid-stream
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or ServingError naming the port and the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR lets a restarted server reuse a port in TIME_WAIT; a live listener still conflicts.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServingError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            f"stop the process listening on port {port} (find it with `ss -ltnp 'sport = :{port}'`), "
            "or choose another port (serving.port; 0 picks a free one)",
        ) from exc
    return sock


def url_for(sock: socket.socket) -> str:
    """The URL a local client uses to reach ``sock`` (wildcard binds map to loopback)."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(model_dir: Path, cfg: ServingConfig, model_name: str, host: str | None = None,
               port: int | None = None, *, api_key: str | None = None,
               on_ready: Callable[[str], None] | None = None, log_level: str = "info") -> None:
    """Load ``model_dir`` and serve it until interrupted (SIGINT/SIGTERM shut down gracefully).

    The port is bound before the model loads, so a busy port fails fast with ServingError. Once
    uvicorn accepts connections, prints ``lmforge-serve listening on URL`` and calls ``on_ready(URL)``.
    """
    import uvicorn  # only the server process needs it
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar per weight file is noise in server.log
    sock = bind_socket(host or cfg.host, cfg.port if port is None else port)
    engine: Engine | None = None
    try:
        engine = Engine.load(Path(model_dir), max_batch_size=cfg.max_batch_size)
        app = create_app(engine, model_name, cfg, api_key=api_key)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        asyncio.run(_serve(server, sock, url_for(sock), on_ready))
    finally:
        sock.close()
        if engine is not None:
            engine.close()


async def _serve(server, sock: socket.socket, url: str, on_ready: Callable[[str], None] | None) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"lmforge-serve listening on {url}", flush=True)
        sys.stdout.flush()
        if on_ready is not None:
            on_ready(url)
    await task
