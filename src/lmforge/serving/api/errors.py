"""Every error the HTTP API answers, as the JSON body OpenAI clients expect.

``{"error": {"message", "type", "param", "code"}}`` for refused requests (4xx), a full queue (429,
``Retry-After``), a server shutting down or whose engine lost its backend (503), a request the engine
failed after taking it (500), unknown routes and methods. :func:`error_response`
is the one place such a body is built, so no error path can answer plain text.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.core.errors import ServingError
from lmforge.serving.backends.base import BackendLost
from lmforge.serving.engine.engine import EngineBusy, RequestError


class ApiError(Exception):
    """An error answered as an OpenAI error body with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _encodable(text: str | None) -> str | None:
    # A message may quote what the client sent, and JSON from a client may hold a lone surrogate
    # ("\ud800"), which UTF-8 cannot encode: the response would fail as a plain-text 500.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-shaped JSON error response."""
    body = {"error": {"message": _encodable(message), "type": type_, "param": _encodable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_SHOWN = 5  # validation errors quoted in one answer


def install_error_handlers(app: FastAPI) -> None:
    """Answer the API's own errors, the engine's refusals, invalid bodies and HTTP errors as JSON."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, headers)

    @app.exception_handler(RequestError)
    async def _request(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(400, f"{exc.cause}; {exc.fix}", exc.param, exc.code)

    @app.exception_handler(EngineBusy)
    async def _busy(_: Request, exc: EngineBusy) -> JSONResponse:
        code = "rate_limit_exceeded" if exc.status == 429 else "server_shutting_down"
        return error_response(exc.status, f"{exc.cause}; {exc.fix}", code=code, type_="server_overloaded",
                              headers={"Retry-After": "1"})

    @app.exception_handler(ServingError)  # the subclasses above keep their own handlers
    async def _failed(_: Request, exc: ServingError) -> JSONResponse:
        # The engine took the request and then failed it: its step failed, it shut down, or it lost its backend.
        lost = isinstance(exc, BackendLost)
        return error_response(503 if lost else 500, f"{exc.cause}; {exc.fix}", code="engine_lost" if lost else
                              "engine_error", type_="server_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
        fields = [[str(p) for p in e.get("loc", ()) if p != "body" and not _type_tag(p)] for e in errors[:_SHOWN]]
        message = "; ".join(f"{'.'.join(f) or 'body'}: {e.get('msg')}" for f, e in zip(fields, errors))
        if len(errors) > _SHOWN:  # a body of a million bad items must not get a message a hundred MB long
            message += f"; and {len(errors) - _SHOWN} more errors"
        param = fields[0][0] if fields and fields[0] else _param_in(message)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))


def _type_tag(part: object) -> bool:
    """pydantic names the member of a union a value failed (``str``, ``list[...]``, ``function-after[...]``) in
    an error's location; a client wants the field's path alone."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})


def _param_in(message: str) -> str | None:
    """A whole-body validator names its field as 'Value error, FIELD: ...'."""
    head = message.split("Value error, ", 1)[-1]
    return head.split(":", 1)[0] if ":" in head and " " not in head.split(":", 1)[0] else None
