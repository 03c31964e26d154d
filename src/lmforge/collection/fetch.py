"""The one HTTP fetcher of the web and feed sources: polite, bounded and SSRF-safe.

Every request, and every hop of a redirect chain, goes through the same steps: the URL must be
http(s) without credentials; robots.txt of its origin must allow it; its host is resolved and every
address judged by :mod:`netguard` *before* any connection (a redirect to 169.254.169.254 is refused
without a packet sent to it); the connection goes to the judged address, with the host name kept
for the Host header, TLS SNI and certificate checks; the host's pace and concurrency are respected
(:mod:`politeness`). Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
(``Retry-After`` honoured, capped); a declared or actual body over ``max_bytes`` is refused, as is
a media type the caller does not accept, before the body is read.

    >>> fetcher = Fetcher(FetchConfig(), allow_private=False, allow_networks=[])
    >>> page = fetcher.get("https://example.org/", accept=("text/html",))
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import io
import socket
import ssl
import time
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from lmforge.collection.archives import TooLarge, read_bounded
from lmforge.collection.netguard import AddressRefused, networks, resolve
from lmforge.collection.politeness import HostGate, RobotsCache

_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUS = (429, 500, 502, 503, 504)
_ERROR_BODY_BYTES = 65536


class FetchError(Exception):
    """A request that produced no usable response; ``reason`` is the key counted in the summary."""

    def __init__(self, reason: str, detail: str, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable = reason, detail, retryable


@dataclass
class Response:
    url: str  # after redirects
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def charset(self) -> str | None:
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.partition("=")
            if key.strip().lower() == "charset" and value.strip():
                return value.strip().strip('"').lower()
        return None

    @property
    def not_modified(self) -> bool:
        return self.status == 304


class Fetcher:
    def __init__(self, cfg: Any, allow_private: bool, allow_networks: list[str]) -> None:
        self.cfg = cfg  # lmforge.config.data.FetchConfig
        self.allow_private = allow_private
        self.allowed = networks(allow_networks)
        self.gate = HostGate(cfg.requests_per_second, cfg.concurrency_per_host)
        self.robots = RobotsCache(cfg.user_agent, self._robots_text, self.gate, cfg.max_backoff_s)
        self._tls = ssl.create_default_context()

    def get(self, url: str, accept: tuple[str, ...] | None = None, etag: str | None = None,
            last_modified: str | None = None) -> Response:
        """GET ``url`` following redirects; raises :class:`FetchError` with a reason when refused."""
        return self._follow(url, accept, etag, last_modified, robots=True)

    def _follow(self, url: str, accept: tuple[str, ...] | None, etag: str | None, last_modified: str | None,
                robots: bool) -> Response:
        for _ in range(self.cfg.max_redirects + 1):
            self._check_url(url)
            refused = self.robots.refusal(url) if robots else None
            if refused is not None:
                raise FetchError(*refused)
            response = self._with_retries(url, accept, etag, last_modified)
            location = response.headers.get("location")
            if response.status in _REDIRECTS and location:
                next_url = urljoin(url, location.strip()).split("#", 1)[0]
                if next_url != url:
                    etag = last_modified = None  # validators belong to the resource that sent them
                url = next_url
                continue
            if response.status == 304 or 200 <= response.status < 300:
                return response
            raise FetchError(f"http_{response.status}", f"{url} answered HTTP {response.status}")
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects from {url}")

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("bad_url", f"{url} is not an http(s) URL")
        if parts.username or parts.password:
            raise FetchError("bad_url", f"{parts.hostname}: URLs with credentials are not fetched")

    def _with_retries(self, url: str, accept: tuple[str, ...] | None, etag: str | None,
                      last_modified: str | None) -> Response:
        for attempt in range(self.cfg.retries + 1):
            last = attempt == self.cfg.retries
            try:
                response = self._once(url, accept, etag, last_modified)
            except FetchError as exc:
                if not exc.retryable or last:
                    raise
                time.sleep(self._backoff(attempt, None))
                continue
            if response.status in _RETRY_STATUS and not last:
                time.sleep(self._backoff(attempt, response.headers.get("retry-after")))
                continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        wait = self.cfg.backoff_s * (2 ** attempt)
        if retry_after:
            wait = max(wait, _retry_after_seconds(retry_after))
        return min(wait, self.cfg.max_backoff_s)

    def _once(self, url: str, accept: tuple[str, ...] | None, etag: str | None,
              last_modified: str | None) -> Response:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = resolve(parts.hostname or "", port, self.allow_private, self.allowed)
        except AddressRefused as exc:
            raise FetchError(exc.reason, exc.detail) from None
        headers = {"User-Agent": self.cfg.user_agent, "Accept-Encoding": "gzip, identity",
                   "Accept": ", ".join(accept) if accept else "*/*"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        with self.gate.turn(parts.netloc.lower()):
            conn = self._connection(parts.scheme, parts.hostname or "", port, addresses)
            try:
                conn.request("GET", target, headers=headers)
                raw = conn.getresponse()
                return self._read(url, raw, accept)
            except (OSError, http.client.HTTPException) as exc:
                raise FetchError("unreachable", f"{url}: {type(exc).__name__}: {exc}", retryable=True) from None
            finally:
                conn.close()

    def _connection(self, scheme: str, host: str, port: int, addresses: list[str]) -> http.client.HTTPConnection:
        timeout = self.cfg.timeout_s
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)

        def pinned(address: tuple[str, int], timeout: float | None = None, source: Any = None) -> socket.socket:
            # Connect to an address judged by netguard, never to a fresh resolution of the name.
            error: OSError | None = None
            for ip in addresses:
                try:
                    return socket.create_connection((ip, port), timeout, source)
                except OSError as exc:
                    error = exc
            raise error or OSError(f"no address for {host}")

        conn._create_connection = pinned  # type: ignore[attr-defined]  # http.client's own hook
        return conn

    def _read(self, url: str, raw: http.client.HTTPResponse, accept: tuple[str, ...] | None) -> Response:
        headers = {k.lower(): v for k, v in raw.getheaders()}
        response = Response(url, raw.status, headers, b"")
        if not 200 <= raw.status < 300:
            response.body = raw.read(_ERROR_BODY_BYTES)
            return response
        if accept and response.media_type not in accept:
            raise FetchError("content_type", f"{url} is {response.media_type or 'untyped'}, not one of {', '.join(accept)}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_bytes:
            raise FetchError("too_large", f"{url} declares {declared} bytes > fetch.max_bytes {self.cfg.max_bytes}")
        response.body = self._body(url, raw, headers.get("content-encoding", "").lower())
        return response

    def _body(self, url: str, raw: http.client.HTTPResponse, encoding: str) -> bytes:
        deadline = time.monotonic() + self.cfg.total_timeout_s
        chunks, size = [], 0
        while True:
            chunk = raw.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > self.cfg.max_bytes:
                raise FetchError("too_large", f"{url} sent more than fetch.max_bytes {self.cfg.max_bytes}")
            if time.monotonic() > deadline:
                raise FetchError("timeout", f"{url} took longer than {self.cfg.total_timeout_s}s", retryable=True)
            chunks.append(chunk)
        body = b"".join(chunks)
        if encoding in ("", "identity"):
            return body
        try:
            if encoding in ("gzip", "x-gzip"):
                return read_bounded(gzip.GzipFile(fileobj=io.BytesIO(body), mode="rb"), self.cfg.max_bytes)
            if encoding == "deflate":
                inflater = zlib.decompressobj()
                data = inflater.decompress(body, self.cfg.max_bytes + 1)
                if len(data) > self.cfg.max_bytes:
                    raise TooLarge("deflate body")
                return data
        except TooLarge:
            raise FetchError("too_large", f"{url} decompresses past fetch.max_bytes {self.cfg.max_bytes}") from None
        except (OSError, EOFError, zlib.error) as exc:
            raise FetchError("bad_encoding", f"{url}: {type(exc).__name__}: {exc}") from None
        raise FetchError("bad_encoding", f"{url} uses unsupported Content-Encoding {encoding}")

    def _robots_text(self, url: str) -> tuple[int, str]:
        """(status, text) of a robots.txt; status 0 when the host could not be reached."""
        try:
            response = self._follow(url, None, None, None, robots=False)
        except FetchError as exc:
            if exc.reason.startswith("http_"):
                return int(exc.reason[5:]), ""
            if exc.reason == "private_address":
                raise
            return 0, ""
        return response.status, response.body[:500_000].decode("utf-8", errors="replace")


def _retry_after_seconds(value: str) -> float:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())
