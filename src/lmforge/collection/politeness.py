"""Politeness: per-host request pacing and concurrency, and robots.txt (RFC 9309).

:class:`HostGate` spaces the *starts* of requests to one host by ``1 / requests_per_second`` (or
the host's robots.txt ``Crawl-delay`` when longer) and caps requests in flight to it.
:class:`RobotsCache` fetches each origin's robots.txt once, through the same safe fetcher: a 4xx
means no rules (crawl allowed), a 5xx or an unreachable host means crawl nothing there, as the RFC
asks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser


class HostGate:
    def __init__(self, requests_per_second: float, per_host: int) -> None:
        self.interval = 1.0 / requests_per_second
        self.per_host = per_host
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._delays: dict[str, float] = {}
        self._slots: dict[str, threading.Semaphore] = {}

    def set_delay(self, host: str, seconds: float) -> None:
        with self._lock:
            self._delays[host] = seconds

    @contextlib.contextmanager
    def turn(self, host: str) -> Iterator[None]:
        """Wait for this host's next free slot and start time, then hold the slot."""
        with self._lock:
            slot = self._slots.setdefault(host, threading.Semaphore(self.per_host))
        with slot:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next.get(host, now))
                self._next[host] = start + max(self.interval, self._delays.get(host, 0.0))
            if start > now:
                time.sleep(start - now)
            yield


class RobotsCache:
    """robots.txt rules per origin, fetched once with ``fetch_robots(url) -> (status, text)``."""

    def __init__(self, user_agent: str, fetch_robots: Callable[[str], tuple[int, str]], gate: HostGate,
                 max_delay_s: float) -> None:
        self.user_agent = user_agent
        self._fetch = fetch_robots
        self._gate = gate
        self._max_delay = max_delay_s
        self._rules: dict[str, tuple[int, RobotFileParser]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def refusal(self, url: str) -> tuple[str, str] | None:
        """(reason, detail) when robots.txt keeps ``url`` out, else None."""
        origin, status, rules = self.rules(url)
        if status == 0:
            return "unreachable", f"cannot reach {origin} (robots.txt fetch failed)"
        if status >= 500:
            return "robots_unavailable", f"{origin}/robots.txt answered {status}: nothing is crawled there (RFC 9309)"
        if not rules.can_fetch(self.user_agent, url):
            return "robots_disallow", f"{url} is disallowed by robots.txt for {self.user_agent}"
        return None

    def rules(self, url: str) -> tuple[str, int, RobotFileParser]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            lock = self._locks.setdefault(origin, threading.Lock())
        with lock:  # one fetch per origin even when many threads ask at once
            if origin not in self._rules:
                self._rules[origin] = self._load(origin, parts.netloc.lower())
            return (origin, *self._rules[origin])

    def _load(self, origin: str, host: str) -> tuple[int, RobotFileParser]:
        parser = RobotFileParser(f"{origin}/robots.txt")
        status, text = self._fetch(f"{origin}/robots.txt")
        if 400 <= status < 500:
            parser.allow_all = True  # type: ignore[attr-defined]  # set in __init__; typeshed omits it
        elif status >= 500 or status == 0:
            parser.disallow_all = True  # type: ignore[attr-defined]  # set in __init__; typeshed omits it
        else:
            parser.parse(text.splitlines())
            delay = parser.crawl_delay(self.user_agent)
            if delay:
                self._gate.set_delay(host, min(float(delay), self._max_delay))
        return status, parser
