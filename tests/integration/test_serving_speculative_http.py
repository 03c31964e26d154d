"""Speculative decoding as an OpenAI client sees it: the same greedy text as a plain server, and ``/metrics``.

A real uvicorn server on loopback, the official ``openai`` client, a tiny random Llama on CPU with
n-gram speculation (the draft model and the sampled distribution are checked at the engine level in
tests/unit/test_serving_speculative.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_model_dir, metric, openai_client, served

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine.metrics import EngineMetrics

# A prompt whose greedy continuation repeats tokens, so n-gram guesses get accepted.
PROMPTS = ["Return the absolute value of a number. Return the absolute value", "abab abab abab ab"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-spec-http"))


def _texts(model_dir: Path, cfg: ServingConfig) -> tuple[list[str], list[str], str]:
    with served(model_dir, cfg, metrics=EngineMetrics()) as (url, _, _):
        client = openai_client(url)
        plain = [client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text
                 for p in PROMPTS]
        stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                           stream=True)
        streamed = ["".join(chunk.choices[0].text for chunk in stream if chunk.choices)]
        return plain, streamed, httpx.get(f"{url}/metrics").text


def test_greedy_text_equals_plain_and_metrics_report_acceptance(model_dir: Path) -> None:
    base = ServingConfig(kv_cache={"block_size": 4})
    want, want_streamed, _ = _texts(model_dir, base)
    spec = ServingConfig(kv_cache={"block_size": 4}, speculative={"method": "ngram", "num_tokens": 4})
    got, got_streamed, metrics = _texts(model_dir, spec)
    assert got == want and got_streamed == want_streamed
    proposed = metric(metrics, "lmforge_spec_decode_proposed_tokens_total")
    accepted = metric(metrics, "lmforge_spec_decode_accepted_tokens_total")
    assert proposed > 0 and 0 <= accepted <= proposed
    assert metric(metrics, "lmforge_spec_decode_acceptance_rate") == pytest.approx(accepted / proposed)
