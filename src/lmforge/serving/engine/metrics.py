"""Prometheus metrics of the inference server, served at ``GET /metrics``.

Gauges are read from the engine when scraped (queue depth, running batch, KV cache use, output
tokens per second over the last 10 s, the prefix cache's hit rate, speculative decoding's
acceptance rate); counters (tokens, requests, prompt tokens looked up in the prefix cache and
those found there, tokens proposed and accepted by speculative decoding) and histograms (time to
first token, inter-token latency, request duration) are fed by the engine thread once per step. The histograms are a small
collector of our own so a step adds all its rows' latencies under one lock instead of taking the
client library's lock per token. Each server has its own registry, so several servers in one
process (tests) never share series. Without ``prometheus_client`` nothing is collected
(:class:`NullMetrics`).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATE_WINDOW_S = 10.0


class NullMetrics:
    """Engine metrics that record nothing (scripts, benchmarks, tests that do not scrape)."""

    def bind(self, queue_depth: Callable[[], float], running: Callable[[], float],
             kv_cache_usage: Callable[[], float]) -> None:
        pass

    def tokens(self, first_token_latencies: Iterable[float], gaps: Iterable[float], count: int) -> None:
        pass

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, duration_s: float) -> None:
        pass

    def rejected(self, status: int) -> None:
        pass

    def prefix_cache(self, queried: int, cached: int) -> None:
        pass

    def speculative(self, proposed: int, accepted: int, backoffs: int = 0, paused: int = 0) -> None:
        pass


class _Histogram:
    """Cumulative-bucket histogram that accepts a batch of observations at once."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, list(buckets)
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v

    def family(self):
        from prometheus_client.core import HistogramMetricFamily

        cumulative, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=self.sum)


class EngineMetrics:
    """The server's metrics in their own registry; :meth:`bind` attaches the engine's live gauges."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._ttft = _Histogram("lmforge_time_to_first_token_seconds", "Request arrival to its first token.",
                                TTFT_BUCKETS)
        self._itl = _Histogram("lmforge_inter_token_latency_seconds", "Time between a request's tokens.",
                               ITL_BUCKETS)
        self._duration = _Histogram("lmforge_request_duration_seconds", "Request arrival to its last token.",
                                    DURATION_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated.", registry=self.registry)
        self.requests = Counter("lmforge_requests", "Finished or refused requests by outcome.", ["outcome"],
                                registry=self.registry)
        self.prefix_queried = Counter("lmforge_prefix_cache_queried_tokens", "Prompt tokens of admitted requests "
                                      "looked up in the prefix cache.", registry=self.registry)
        self.prefix_cached = Counter("lmforge_prefix_cache_cached_tokens", "Prompt tokens found in the prefix "
                                     "cache (their prefill was skipped).", registry=self.registry)
        self._prefix = [0, 0]  # queried, cached: for the hit-rate gauge
        self.spec_proposed = Counter("lmforge_spec_decode_proposed_tokens", "Tokens proposed by speculative "
                                     "decoding (n-gram or draft model).", registry=self.registry)
        self.spec_accepted = Counter("lmforge_spec_decode_accepted_tokens", "Proposed tokens the model accepted.",
                                     registry=self.registry)
        self._spec = [0, 0]  # proposed, accepted: for the acceptance-rate gauge
        self.spec_backoffs = Counter("lmforge_spec_decode_backoffs", "Times a sequence stopped speculating because "
                                     "its guesses kept failing (serving.speculative.backoff_acceptance).",
                                     registry=self.registry)
        self.spec_paused = Counter("lmforge_spec_decode_paused_steps", "Decode steps sequences took without "
                                   "guesses while backed off.", registry=self.registry)
        self.registry.register(self)

    def bind(self, queue_depth: Callable[[], float], running: Callable[[], float],
             kv_cache_usage: Callable[[], float]) -> None:
        self._gauges = {
            "lmforge_queue_depth": ("Requests waiting for a batch slot.", queue_depth),
            "lmforge_running_requests": ("Requests in the running batch (prefilling or decoding).", running),
            "lmforge_kv_cache_usage_ratio": ("Fraction of the KV cache reserved by admitted requests.",
                                             kv_cache_usage),
            "lmforge_generation_tokens_per_second": ("Output tokens per second over the last 10 s.",
                                                     self._tokens_per_second),
            "lmforge_prefix_cache_hit_rate": ("Fraction of the prompt tokens looked up in the prefix cache that "
                                              "were found there, since the server started.", self._prefix_hit_rate),
            "lmforge_spec_decode_acceptance_rate": ("Fraction of the speculatively proposed tokens that were accepted, "
                                                    "since the server started.", self._acceptance_rate),
        }

    # ------------------------------------------------------------ fed by the engine thread

    def tokens(self, first_token_latencies: Iterable[float], gaps: Iterable[float], count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._ttft.observe_many(first_token_latencies)
            self._itl.observe_many(gaps)
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent.popleft()
        self.generation_tokens.inc(count)

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, duration_s: float) -> None:
        with self._lock:
            self._duration.observe_many([duration_s])
        self.prompt_tokens.inc(prompt_tokens)
        self.requests.labels(outcome=outcome).inc()

    def rejected(self, status: int) -> None:
        self.requests.labels(outcome=f"rejected_{status}").inc()

    def prefix_cache(self, queried: int, cached: int) -> None:
        with self._lock:
            self._prefix[0] += queried
            self._prefix[1] += cached
        self.prefix_queried.inc(queried)
        self.prefix_cached.inc(cached)

    def speculative(self, proposed: int, accepted: int, backoffs: int = 0, paused: int = 0) -> None:
        with self._lock:
            self._spec[0] += proposed
            self._spec[1] += accepted
        self.spec_proposed.inc(proposed)
        self.spec_accepted.inc(accepted)
        self.spec_backoffs.inc(backoffs)
        self.spec_paused.inc(paused)

    # ------------------------------------------------------------ scraped

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            total = sum(count for t, count in self._recent if t >= now - _RATE_WINDOW_S)
        return total / _RATE_WINDOW_S

    def _prefix_hit_rate(self) -> float:
        with self._lock:
            queried, cached = self._prefix
        return cached / queried if queried else 0.0

    def _acceptance_rate(self) -> float:
        with self._lock:
            proposed, accepted = self._spec
        return accepted / proposed if proposed else 0.0

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        for name, (doc, read) in self._gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(read()))
        with self._lock:
            families = [h.family() for h in (self._ttft, self._itl, self._duration)]
        yield from families

    def describe(self):
        return []  # collected live; no fixed description needed at registration

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
