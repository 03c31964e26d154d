"""The engine's refusals: a request it cannot serve as asked (HTTP 400), and no room for new work (429 / 503).

Their own module, below ``requests`` and ``structured``, both of which raise them.
"""

from __future__ import annotations

from lmforge.core.errors import ServingError


class RequestError(ServingError):
    """A request the engine cannot serve as asked; ``param`` names the request field at fault."""

    def __init__(self, cause: str, fix: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(cause, fix)
        self.param = param
        self.code = code


class EngineBusy(ServingError):
    """The engine refuses new work for now: its queue is full (429) or it is shutting down (503)."""

    def __init__(self, cause: str, fix: str, status: int = 429) -> None:
        super().__init__(cause, fix)
        self.status = status

    def __reduce__(self):
        return (type(self), (self.cause, self.fix, self.status))
