"""Run the inference server: bind the socket, load the engine, serve until signalled, drain.

:func:`run_server` is what ``python -m lmforge.serving MODEL`` and ``lmforge serve MODEL`` call.
The port is bound before the model loads, so a busy port fails fast. Binding beyond loopback
without an API key is refused unless ``serving.server.allow_unauthenticated_remote`` says otherwise. On
SIGINT/SIGTERM uvicorn stops accepting connections and lets open ones finish for up to
``serving.server.drain_timeout_s``; then the engine gets what is left of that time before it stops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError


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
            "or choose another port (serving.server.port; 0 picks a free one)",
        ) from exc
    return sock


def url_for(sock: socket.socket) -> str:
    """The URL a local client uses to reach ``sock`` (wildcard binds map to loopback)."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_exposure(host: str, api_keys: Sequence[str], cfg: ServingConfig) -> None:
    """Refuse to serve beyond loopback without a key, unless the config explicitly allows it."""
    if is_loopback(host) or api_keys or cfg.server.allow_unauthenticated_remote:
        return
    raise ServingError(
        f"refusing to listen on {host} without an API key: anyone who reaches it could use the model",
        "set LMFORGE_API_KEY (clients then send 'Authorization: Bearer <key>'), bind to 127.0.0.1, or set "
        "serving.server.allow_unauthenticated_remote: true if the network is trusted",
    )


def parse_keys(value: str | Sequence[str] | None) -> list[str]:
    """API keys from a comma-separated string (``LMFORGE_API_KEY=k1,k2``) or a list."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [k.strip() for k in items if k and k.strip()]


def run_server(model_dir: Path, cfg: ServingConfig, model_name: str, host: str | None = None,
               port: int | None = None, *, api_key: str | Sequence[str] | None = None,
               on_ready: Callable[[str], None] | None = None, log_level: str = "info",
               release: dict[str, str] | None = None) -> None:
    """Load ``model_dir`` and serve it until interrupted (SIGINT/SIGTERM drain, then stop).

    Once uvicorn accepts connections, prints ``lmforge-serve listening on URL`` and calls ``on_ready(URL)``.
    """
    import uvicorn  # only the server process needs it
    from transformers.utils import logging as hf_logging

    from lmforge.serving.api.server import create_app
    from lmforge.serving.engine.engine import Engine

    hf_logging.disable_progress_bar()  # a progress bar per weight file is noise in server.log
    keys = parse_keys(api_key)
    host = host or cfg.server.host
    check_exposure(host, keys, cfg)
    sock = bind_socket(host, cfg.server.port if port is None else port)
    engine: Engine | None = None
    stop_at: list[float] = []
    try:
        engine = Engine.load(Path(model_dir), cfg=cfg, metrics=_metrics())
        app = create_app(engine, model_name, cfg, api_key=keys, release=release)
        drain_s = max(cfg.server.drain_timeout_s, 0.1)
        config = uvicorn.Config(
            app, log_level=log_level,
            timeout_graceful_shutdown=drain_s,  # type: ignore[arg-type]  # stub says int; asyncio.timeout takes float
        )
        server = uvicorn.Server(config)
        asyncio.run(_serve(server, sock, url_for(sock), on_ready, stop_at))
    finally:
        sock.close()
        if engine is not None:
            left = cfg.server.drain_timeout_s - (time.monotonic() - stop_at[0]) if stop_at else 0.0
            engine.close(drain_timeout_s=max(left, 0.0))


def _metrics():
    try:
        from lmforge.serving.engine.metrics import EngineMetrics

        return EngineMetrics()
    except ImportError:  # prometheus_client missing: serve without /metrics
        return None


async def _serve(server, sock: socket.socket, url: str, on_ready: Callable[[str], None] | None,
                 stop_at: list[float]) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"lmforge-serve listening on {url}", flush=True)
        sys.stdout.flush()
        if on_ready is not None:
            on_ready(url)
    while not task.done() and not server.should_exit:
        await asyncio.sleep(0.05)
    stop_at.append(time.monotonic())  # the drain clock starts at the signal
    await task
