"""The deployment's front proxy as an ASGI app, called in-process: its admin routes answer only loopback with the
token, a switch moves new requests, a drain waits for the old upstream's requests in flight, and a request it
cannot forward gets an OpenAI-shaped error (502 for an upstream that refuses, 413 past the body limit)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from lmforge.serving.api import PROXY_ADMIN_PATH, PROXY_TOKEN_HEADER
from lmforge.serving.api.proxy import RollingProxy

TOKEN = "s3cret"


async def call(app: RollingProxy, path: str, payload: Any = None, client: str = "127.0.0.1",
               token: str | None = TOKEN, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    messages = [{"type": "http.request", "body": body if body is not None else json.dumps(payload or {}).encode(),
                 "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(PROXY_TOKEN_HEADER.encode(), token.encode())] if token else []
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "client": (client, 5555)}
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket closes


def test_admin_needs_the_token_from_loopback_and_switch_moves_the_upstream():
    async def run() -> None:
        app = RollingProxy("http://127.0.0.1:1", TOKEN, 1024)
        assert (await call(app, f"{PROXY_ADMIN_PATH}switch", {"upstream": "http://x"}, token=None))[0] == 403
        assert (await call(app, f"{PROXY_ADMIN_PATH}switch", {"upstream": "http://x"}, client="10.0.0.5"))[0] == 403
        status, state = await call(app, f"{PROXY_ADMIN_PATH}switch", {"upstream": "http://127.0.0.1:2"})
        assert status == 200 and state["upstream"] == app.current == "http://127.0.0.1:2"

    asyncio.run(run())


def test_drain_waits_for_the_requests_in_flight_on_the_old_upstream():
    async def run() -> None:
        app = RollingProxy("http://new", TOKEN, 1024)
        app.inflight["http://old"] = 1  # a request that started before the switch
        drain = asyncio.create_task(app.drain("http://old", timeout_s=10))
        await asyncio.sleep(0.1)
        assert not drain.done()
        app.inflight["http://old"] -= 1
        async with app.idle:
            app.idle.notify_all()
        assert await drain is True and "http://old" not in app.inflight
        assert await app.drain("http://new", timeout_s=1) is False  # the current upstream is never drained
        app.inflight["http://stuck"] = 1
        assert await app.drain("http://stuck", timeout_s=0.1) is False

    asyncio.run(run())


def test_unreachable_upstream_is_a_502_and_a_large_body_a_413():
    async def run() -> None:
        app = RollingProxy(closed_port_url(), TOKEN, 64)
        status, body = await call(app, "/v1/completions", {"prompt": "a"})
        assert status == 502 and body["error"]["type"] == "server_error" and "did not answer" in body["error"]["message"]
        assert app.inflight[app.current] == 0  # counted and released
        status, body = await call(app, "/v1/completions", body=b"x" * 65)
        assert status == 413 and "64 bytes" in body["error"]["message"]
        await app.close()

    asyncio.run(run())
