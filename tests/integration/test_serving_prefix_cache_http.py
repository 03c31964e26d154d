"""Prefix caching as an OpenAI client sees it: ``usage.prompt_tokens_details.cached_tokens`` and ``/metrics``.

A real uvicorn server on loopback, the official ``openai`` client, a tiny random Llama on CPU. The
engine-level checks (outputs unchanged, adapters, eviction, leaks) are in
tests/unit/test_serving_prefix_cache.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_model_dir, metric, openai_client, served

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine.metrics import EngineMetrics

SYSTEM = "You answer questions about json.dumps. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-prefix-http"))


def test_cached_tokens_in_usage_and_metrics(model_dir: Path) -> None:
    with served(model_dir, ServingConfig(kv_cache={"block_size": 4}), metrics=EngineMetrics()) as (url, _, _):
        client = openai_client(url)
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
    queried = metric(text, "lmforge_prefix_cache_queried_tokens_total")
    cached = metric(text, "lmforge_prefix_cache_cached_tokens_total")
    assert queried >= first.prompt_tokens + second.prompt_tokens + usage.prompt_tokens
    assert cached >= second.prompt_tokens_details.cached_tokens > 0
    assert metric(text, "lmforge_prefix_cache_hit_rate") == pytest.approx(cached / queried)
