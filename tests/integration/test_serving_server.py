"""The server under stress and at its edges: overload, disconnects, shutdown, metrics, keys, echo.

Real uvicorn servers on loopback, real HTTP (httpx and the official ``openai`` client), a tiny
random Llama on CPU.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import make_tiny_model_dir, running

from lmforge.config.serving import ServerConfig, ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.api.launch import check_exposure, parse_keys, run_server
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.metrics import EngineMetrics


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-server"))


def _engine(model_dir: Path, metrics: EngineMetrics | None = None, **cfg) -> tuple[Engine, ServingConfig]:
    config = ServingConfig(**cfg)
    return Engine.load(model_dir, device="cpu", cfg=config, metrics=metrics or EngineMetrics()), config


def _wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_ten_times_capacity_gets_only_200_429_503_then_serves_normally(model_dir: Path) -> None:
    engine, cfg = _engine(model_dir, scheduler={"max_batch_size": 2, "max_queue": 2}, max_new_tokens=40)
    capacity = cfg.scheduler.max_batch_size + cfg.scheduler.max_queue
    try:
        with running(engine, cfg) as (url, _):
            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    body = {"prompt": "The quick", "max_tokens": 40, "temperature": 0}
                    return await asyncio.gather(*[http.post("/v1/completions", json=body)
                                                  for _ in range(10 * capacity)])

            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(2):  # twice: memory must not grow with repeated overload
                replies = asyncio.run(burst())
                codes = [r.status_code for r in replies]
                assert set(codes) <= {200, 429, 503} and codes.count(200) >= cfg.scheduler.max_batch_size
                assert 429 in codes and all(r.json()["error"]["code"] == "rate_limit_exceeded"
                                            for r in replies if r.status_code == 429)
                assert all(r.headers.get("retry-after") for r in replies if r.status_code == 429)
            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB
            after = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4})
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
            metrics = httpx.get(f"{url}/metrics").text
            assert 'lmforge_requests_total{outcome="rejected_429"}' in metrics
    finally:
        engine.close()


class PacedMetrics(EngineMetrics):
    """The server's real metrics, whose per-step token hook can pace the engine thread (``pace`` seconds a
    step, after the step's text is sent; the test sets 20 ms): a 120-token request then runs ~2.4 s, so it is certainly still
    running while the test acts on its client. Unpaced, the tiny model may finish all 120 tokens (~40 ms)
    before a busy test looks."""

    def __init__(self) -> None:
        super().__init__()
        self.pace = 0.0

    def tokens(self, first_token_latencies, gaps, count: int) -> None:
        super().tokens(first_token_latencies, gaps, count)
        if self.pace:
            time.sleep(self.pace)


def test_client_disconnect_frees_the_slot_at_once(model_dir: Path) -> None:
    metrics = PacedMetrics()
    engine, cfg = _engine(model_dir, metrics, scheduler={"max_batch_size": 1}, max_new_tokens=120)
    try:
        with running(engine, cfg) as (url, _):
            body = {"prompt": "The quick", "max_tokens": 120, "stream": True, "temperature": 1.0,
                    "seed": 1}
            metrics.pace = 0.02
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
                assert next(reply.iter_lines()).startswith("data: ")
                assert engine.active == 1
            # Closed mid-stream: the row and its KV cache blocks come back within a few steps.
            assert _wait_until(lambda: engine.active == 0 and engine.cache_usage == 0.0, 2.0)
            assert 'outcome="cancelled"' in httpx.get(f"{url}/metrics").text
            # A non-streaming request whose client times out is cancelled too (paced: it cannot finish first).
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.05)
            assert _wait_until(lambda: engine.active == 0, 3.0)
            metrics.pace = 0.0
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
            assert 'lmforge_requests_total{outcome="cancelled"} 2.0' in httpx.get(f"{url}/metrics").text
    finally:
        engine.close()


def test_shutdown_drains_running_streams(model_dir: Path) -> None:
    engine, cfg = _engine(model_dir, max_new_tokens=60)
    events: list[str] = []
    try:
        with running(engine, cfg, drain_s=10) as (url, server):
            def consume() -> None:
                body = {"prompt": "The quick", "max_tokens": 60, "stream": True, "temperature": 0}
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
                    events.extend(line for line in reply.iter_lines() if line)

            client = threading.Thread(target=consume)
            client.start()
            assert _wait_until(lambda: engine.active == 1, 5)
            server.should_exit = True  # what SIGTERM does
            client.join(timeout=20)
        assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
        # The engine drains too: a request admitted before close() finishes normally.
        stream_done = engine.generate(["a"], SamplingParams(max_tokens=3))[0]
        assert stream_done.completion_tokens == 3
    finally:
        engine.close(drain_timeout_s=5)
    with pytest.raises(ServingError, match="shutting down"):
        engine.submit([1, 2], SamplingParams(max_tokens=2), lambda _: None)


def test_metrics_report_queue_batch_cache_and_latencies(model_dir: Path) -> None:
    engine, cfg = _engine(model_dir)
    try:
        with running(engine, cfg) as (url, _):
            for _ in range(2):
                reply = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 5})
                assert reply.status_code == 200
            text = httpx.get(f"{url}/metrics").text
        for name in ("lmforge_queue_depth", "lmforge_running_requests", "lmforge_kv_cache_usage_ratio",
                     "lmforge_generation_tokens_per_second", "lmforge_time_to_first_token_seconds_bucket",
                     "lmforge_inter_token_latency_seconds_bucket", "lmforge_request_duration_seconds_count"):
            assert name in text, name
        count = next(line for line in text.splitlines() if line.startswith("lmforge_time_to_first_token_seconds_count"))
        assert float(count.split()[-1]) == 2
        assert "lmforge_generation_tokens_total 10.0" in text
    finally:
        engine.close()


def test_remote_bind_needs_a_key_unless_allowed(model_dir: Path) -> None:
    cfg = ServingConfig()
    with pytest.raises(ServingError) as err:
        run_server(model_dir, cfg, "tiny", host="0.0.0.0", port=0)  # refused before anything loads
    assert "0.0.0.0" in err.value.cause and "LMFORGE_API_KEY" in err.value.fix
    check_exposure("0.0.0.0", ["k"], cfg)
    check_exposure("0.0.0.0", [], ServingConfig(server=ServerConfig(allow_unauthenticated_remote=True)))
    check_exposure("127.0.0.1", [], cfg)
    check_exposure("::1", [], cfg)
    assert parse_keys(" a, b ,") == ["a", "b"]


def test_several_api_keys_and_metrics_behind_them(model_dir: Path) -> None:
    engine, cfg = _engine(model_dir)
    try:
        with running(engine, cfg, api_key=["one", "two"]) as (url, _):
            for key in ("one", "two"):
                assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert httpx.get(f"{url}/metrics").status_code == 401
            assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer two"}).status_code == 200
    finally:
        engine.close()


def test_openai_client_echo_with_prompt_logprobs(model_dir: Path) -> None:
    engine, cfg = _engine(model_dir)
    try:
        with running(engine, cfg) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            prompt = "The quick brown fox"
            scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
            lp = scored.choices[0].logprobs
            assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
            assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
            assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
            both = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, echo=True, logprobs=1,
                                             temperature=0)
            text = both.choices[0].text
            assert text.startswith(prompt) and len(both.choices[0].logprobs.tokens) == len(lp.tokens) + 5
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=5, echo=True, logprobs=1,
                                                    temperature=0, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == text
    finally:
        engine.close()
