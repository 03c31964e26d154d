"""The front proxy of a local deployment: a stable port whose upstream server can be swapped without a failed request.

    python -m lmforge.serving.api.proxy --upstream URL --ready-file PATH --token-file PATH
                                    [--host 127.0.0.1] [--port 0] [--serving-config PATH]

The deploy stage (``stages/deploy.py``) keeps this small process on the endpoint's port across deploys
and rolls the model server behind it: start the new server on a loopback port of its own, probe it,
``POST /_lmforge/proxy/switch`` here, ``POST /_lmforge/proxy/drain`` for the old one, then stop it.

Why a proxy and not ``SO_REUSEPORT`` on the servers themselves: on Linux, connections that finished
their handshake in a closing listener's accept queue are reset (unless ``net.ipv4.tcp_migrate_req`` is
on), and a client's keep-alive connection to the old server is closed under it when that server
drains, so a request racing that close fails. Here, clients keep their connections to the proxy;
each request picks the upstream at the moment it starts and is counted against it, so the old server
is stopped only when nothing is in flight on it. HTTP is parsed by uvicorn and spoken upstream by
httpx; this module only routes. Responses, streamed ones included, pass through chunk by chunk.

The admin routes answer only loopback clients that send the token of ``--token-file`` (a file only
the deploying user can read) in ``X-Lmforge-Proxy-Token``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

PROXY_ADMIN_PATH = "/_lmforge/proxy/"
PROXY_TOKEN_HEADER = "x-lmforge-proxy-token"
# Never forwarded: they describe one connection, not the request (RFC 9110 section 7.6.1); uvicorn
# writes its own date and server.
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"host", b"date", b"server"}
# Below uvicorn's 5 s keep-alive timeout, so the proxy never reuses a connection the server is closing.
_KEEPALIVE_S = 2.0

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RollingProxy:
    """An ASGI app forwarding every request to the current upstream and counting what is in flight on each."""

    def __init__(self, upstream: str, token: str, max_body_bytes: int) -> None:
        self.current = upstream
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.inflight: dict[str, int] = {}
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.idle = asyncio.Condition()

    def client(self, upstream: str) -> httpx.AsyncClient:
        if upstream not in self.clients:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=_KEEPALIVE_S)
            timeout = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)  # a generation may take long
            self.clients[upstream] = httpx.AsyncClient(base_url=upstream, limits=limits, timeout=timeout)
        return self.clients[upstream]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.close)
            return
        if scope["type"] != "http":
            return
        if scope["path"].startswith(PROXY_ADMIN_PATH):
            await self.admin(scope, receive, send)
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            await _json(send, 413, _error(f"the request body exceeds {self.max_body_bytes} bytes",
                                          "invalid_request_error"))
            return
        upstream = self.current  # picked and counted in one step of the event loop: a drain sees it
        self.inflight[upstream] = self.inflight.get(upstream, 0) + 1
        try:
            await _until_disconnect(self.forward(upstream, scope, body, send), receive)
        finally:
            self.inflight[upstream] -= 1
            async with self.idle:
                self.idle.notify_all()

    async def forward(self, upstream: str, scope: Scope, body: bytes, send: Send) -> None:
        path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        client = self.client(upstream)
        request = client.build_request(scope["method"], path, headers=headers, content=body)
        try:
            try:
                response = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                # A pooled connection that closed just as it was reused: nothing reached the engine; once more.
                response = await client.send(client.build_request(scope["method"], path, headers=headers,
                                                                  content=body), stream=True)
        except httpx.HTTPError as exc:
            await _json(send, 502, _error(f"the model server at {upstream} did not answer: {exc}", "server_error"))
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()  # also on a client disconnect: the server then cancels the request

    async def admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_host = (scope.get("client") or ("", 0))[0]
        sent = dict(scope["headers"]).get(PROXY_TOKEN_HEADER.encode(), b"")
        if not _loopback(client_host) or not hmac.compare_digest(sent, self.token.encode()):
            await _json(send, 403, _error("the proxy's admin routes need its token, from loopback", "forbidden"))
            return
        raw = await _read_body(receive, 64 * 1024)
        args = json.loads(raw or b"{}")
        action = scope["path"][len(PROXY_ADMIN_PATH):]
        if action == "switch" and scope["method"] == "POST":
            self.current = str(args["upstream"])
        elif action == "drain" and scope["method"] == "POST":
            drained = await self.drain(str(args["upstream"]), float(args.get("timeout_s", 30)))
            await _json(send, 200, {**self.state(), "drained": drained})
            return
        elif action != "state":
            await _json(send, 404, _error(f"no admin route {action!r}", "not_found"))
            return
        await _json(send, 200, self.state())

    async def drain(self, upstream: str, timeout_s: float) -> bool:
        """Wait until no request is in flight on ``upstream`` (not the current one), then drop its connections."""
        if upstream == self.current:
            return False
        try:
            async with self.idle:
                await asyncio.wait_for(self.idle.wait_for(lambda: self.inflight.get(upstream, 0) == 0), timeout_s)
        except TimeoutError:
            return False
        client = self.clients.pop(upstream, None)
        self.inflight.pop(upstream, None)
        if client is not None:
            await client.aclose()
        return True

    def state(self) -> dict[str, Any]:
        return {"upstream": self.current, "inflight": dict(self.inflight), "pid": os.getpid()}

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()


async def _until_disconnect(work: Awaitable[None], receive: Receive) -> None:
    """Run ``work``; if the client disconnects first, cancel it (closing the upstream request with it)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure
    finally:
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error(message: str, kind: str) -> dict[str, Any]:
    """The OpenAI-shaped error body the model server also answers with."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _lifespan(receive: Receive, send: Send, on_shutdown: Callable[[], Awaitable[None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmforge.serving.api.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the model server's base URL to start with")
    parser.add_argument("--ready-file", type=Path, required=True, help="write {url, pid} here once listening")
    parser.add_argument("--token-file", type=Path, required=True, help="the admin token, on its first line")
    parser.add_argument("--host", default=None, help="bind address (default: serving.server.host)")
    parser.add_argument("--port", type=int, default=None, help="the stable port; 0 picks a free one")
    parser.add_argument("--serving-config", type=Path, default=None, help="JSON/YAML file of ServingConfig fields")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from lmforge.core.errors import LmforgeError
    from lmforge.core.workspace import atomic_write_json
    from lmforge.serving.api.launch import bind_socket, check_exposure, parse_keys, url_for
    from lmforge.serving.api.serve import load_serving_config

    args = _parse(argv)
    try:
        cfg = load_serving_config(args.serving_config)
        host = args.host or cfg.server.host
        # The same rule as the server's: beyond loopback only with an API key (the server behind checks it).
        check_exposure(host, parse_keys(os.environ.get("LMFORGE_API_KEY")), cfg)
        sock = bind_socket(host, cfg.server.port if args.port is None else args.port)
    except LmforgeError as exc:
        print(f"error: {exc.cause}\nfix: {exc.fix}", file=sys.stderr, flush=True)
        return exc.exit_code
    token = args.token_file.read_text().splitlines()[0].strip()
    app = RollingProxy(args.upstream, token, cfg.limits.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=int(cfg.server.drain_timeout_s) + 1))

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            atomic_write_json(args.ready_file, {"url": url_for(sock), "pid": os.getpid()})
            print(f"lmforge-proxy listening on {url_for(sock)} -> {args.upstream}", flush=True)
        await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
