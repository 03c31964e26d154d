"""What one request may ask of the server (``serving.limits``), enforced before the work it would cost.

:class:`BodyLimit` (ASGI middleware) answers 413 to a body past ``max_body_bytes``: from its
Content-Length before a byte of it is read, or as soon as that many bytes have arrived (a chunked
upload), so a 50 MB request never reaches the JSON parser and leaves no memory behind.
:class:`RequestLimits` checks a parsed request: its ``stop`` strings and logprobs, its ``n`` and ``best_of``, and its prompt
twice, by characters before tokenizing (a prompt of more than max_prompt_tokens x
max_chars_per_token characters cannot fit, and tokenizing megabytes takes seconds) and by tokens after.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.config.serving import LimitsConfig
from lmforge.serving.api.errors import ApiError, error_response


class BodyLimit:
    """Read a request's whole body, up to ``max_bytes``, before the app sees it; 413 past that."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(declared, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                chunks.clear()
                await self._refuse(size, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay() -> Message:
            # The app reads the body once; after that it listens for the client going away.
            nonlocal replayed, body
            if replayed:
                return await receive()
            replayed = True
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"the request body has {size} bytes or more, past this server's limit of {self.max_bytes} "
            "(serving.limits.max_body_bytes); send a shorter prompt, or raise serving.limits.max_body_bytes",
            code="request_too_large")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before the app runs
    return None


@dataclass(frozen=True)
class RequestLimits:
    """``serving.limits`` against one parsed request; each refusal is an :class:`ApiError` naming the key."""

    cfg: LimitsConfig
    context_window: int

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.cfg.max_prompt_tokens or self.context_window, self.context_window)

    def check_sampling(self, stop: list[str], logprobs: int | None, logprobs_param: str) -> None:
        """``stop`` strings (how many, how long) and the alternatives asked per token."""
        if len(stop) > self.cfg.max_stop:
            raise ApiError(400, f"{len(stop)} stop strings; this server takes at most {self.cfg.max_stop} "
                           "(serving.limits.max_stop)", param="stop", code="invalid_value")
        longest = max(stop, key=len, default="")
        if len(longest) > self.cfg.max_stop_chars:
            raise ApiError(400, f"a stop string of {len(longest)} characters; this server takes at most "
                           f"{self.cfg.max_stop_chars} (serving.limits.max_stop_chars)", param="stop",
                           code="invalid_value")
        if logprobs is not None and logprobs > self.cfg.max_logprobs:
            raise ApiError(400, f"{logprobs_param} is {logprobs}; this server reports at most {self.cfg.max_logprobs} "
                           "alternatives per token (serving.limits.max_logprobs)", param=logprobs_param,
                           code="invalid_value")

    def check_choices(self, n: int, best_of: int | None = None) -> None:
        """``n`` choices and ``best_of`` candidates: each is a sequence decoded, so both are capped by ``max_n``."""
        most = self.cfg.max_n
        if n > most:
            raise ApiError(400, f"n is {n}; this server returns at most {most} choices per request "
                           "(serving.limits.max_n); ask for fewer, or raise serving.limits.max_n", param="n",
                           code="invalid_value")
        if best_of is not None and best_of < n:
            raise ApiError(400, f"best_of ({best_of}) is less than n ({n}): the n choices are picked among best_of "
                           "candidates; send best_of >= n, or leave it out", param="best_of", code="invalid_value")
        if best_of is not None and best_of > most:
            raise ApiError(400, f"best_of is {best_of}; this server generates at most {most} candidates per request "
                           "(serving.limits.max_n); ask for fewer, or raise serving.limits.max_n", param="best_of",
                           code="invalid_value")

    def check_chars(self, chars: int, param: str, turns: int = 0) -> None:
        """Refuse a prompt too long to fit before paying for its rendering and tokenization. A chat's
        ``turns`` count a token each at least (the template marks every message's role)."""
        if chars / self.cfg.max_chars_per_token + turns > self.max_prompt_tokens:
            in_turns = f" in {turns} messages" if turns else ""
            raise ApiError(400, f"the prompt has {chars} characters{in_turns}, more than {self.max_prompt_tokens} "
                           f"tokens (this server's limit) can hold at {self.cfg.max_chars_per_token} characters per "
                           "token (serving.limits.max_chars_per_token) and one per message; shorten the prompt",
                           param=param, code="context_length_exceeded")

    def check_tokens(self, tokens: int, param: str) -> None:
        """The configured prompt-token cap (the context window itself is the engine's check)."""
        most = self.cfg.max_prompt_tokens
        if most is not None and tokens > most:
            raise ApiError(400, f"the prompt has {tokens} tokens; this server takes at most {most} "
                           "(serving.limits.max_prompt_tokens); shorten the prompt", param=param,
                           code="context_length_exceeded")
