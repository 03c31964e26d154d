"""Prefix caching as an OpenAI client sees it: ``usage.prompt_tokens_details.cached_tokens`` and ``/metrics``.

A real uvicorn server on loopback, the official ``openai`` client, a tiny random Llama on CPU. The
engine-level checks (outputs unchanged, adapters, eviction, leaks) are in
tests/unit/test_serving_prefix_cache.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from helpers import make_tiny_model_dir, running

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Engine
from lmforge.serving.engine.metrics import EngineMetrics

SYSTEM = "You answer questions about json.dumps. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-prefix-http"))


def _metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def test_cached_tokens_in_usage_and_metrics(model_dir: Path) -> None:
    cfg = ServingConfig(kv_cache={"block_size": 4})
    engine = Engine.load(model_dir, device="cpu", cfg=cfg, metrics=EngineMetrics())
    try:
        with running(engine, cfg) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            replies = []
            for question in ("What does it do?", "Why?"):
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
                replies.append(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                              temperature=0))
            first, second = (r.usage for r in replies)
            assert first is not None and second is not None
            assert first.prompt_tokens_details is not None and first.prompt_tokens_details.cached_tokens == 0
            assert second.prompt_tokens_details is not None
            assert 0 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens
            # Streamed, with usage asked for: the last chunk carries it.
            stream = client.completions.create(model="tiny", prompt=SYSTEM + " Again.", max_tokens=3, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
            assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 0
            text = httpx.get(f"{url}/metrics").text
        queried = _metric(text, "lmforge_prefix_cache_queried_tokens_total")
        cached = _metric(text, "lmforge_prefix_cache_cached_tokens_total")
        assert queried >= first.prompt_tokens + second.prompt_tokens + usage.prompt_tokens
        assert cached >= second.prompt_tokens_details.cached_tokens > 0
        assert _metric(text, "lmforge_prefix_cache_hit_rate") == pytest.approx(cached / queried)
    finally:
        engine.close()
