"""``n`` and ``best_of`` (api/choices.py): derived seeds, the ranking, usage, and the 400s naming the field.

The pure parts run on hand-made completions; the refusals through FastAPI's TestClient over the
tiny model of tests/conftest.py (in-process, no server). The official client against a real server
is tests/integration/test_serving_choices_http.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lmforge.config.serving import ServingConfig
from lmforge.serving.api.choices import best, choice_seed, mean_logprob, usage_of
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine
from lmforge.serving.engine.requests import Completion
from lmforge.serving.engine.sampling import TokenLogprob

CFG = ServingConfig(max_new_tokens=2, limits={"max_n": 3})
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _completion(logprobs: list[float], cached: int = 0) -> Completion:
    entries = tuple(TokenLogprob(i, str(i), lp) for i, lp in enumerate(logprobs))
    return Completion(text="".join(e.token for e in entries), token_ids=tuple(range(len(logprobs))),
                      finish_reason="length", prompt_tokens=7, completion_tokens=len(logprobs),
                      logprobs=entries, cached_tokens=cached)


def test_choice_zero_keeps_the_seed_and_the_others_derive_distinct_ones() -> None:
    assert choice_seed(7, 0) == 7
    seeds = [choice_seed(7, i) for i in range(1, 6)]
    assert len(set(seeds)) == 5 and seeds == [choice_seed(7, i) for i in range(1, 6)]
    assert choice_seed(7, 1) != choice_seed(8, 0) and all(0 <= s < 2**63 for s in seeds)


def test_best_ranks_by_mean_token_logprob_and_usage_sums_completions() -> None:
    long_good, short_bad, short_good = _completion([-0.5] * 6, 4), _completion([-2.0], 4), _completion([-0.1, -0.3], 0)
    assert mean_logprob(short_good) == pytest.approx(-0.2)
    # Per token, not in total: the six-token answer (total -3) beats the one-token one (total -2).
    assert best([long_good, short_bad, short_good], 2) == [short_good, long_good]
    usage = usage_of([long_good, short_bad, short_good])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 9, 16)
    assert usage.prompt_tokens_details.cached_tokens == 0  # the fewest any sibling found


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    engine = Engine.load(model_dir, device="cpu", cfg=CFG)
    yield TestClient(create_app(engine, "tiny", CFG), raise_server_exceptions=False)
    engine.close()


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    (COMPLETIONS, {"prompt": "hi", "n": 4}, "n", "serving.limits.max_n"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "n": 4}, "n", "serving.limits.max_n"),
    (COMPLETIONS, {"prompt": "hi", "n": 10**30}, "n", "serving.limits.max_n"),
    (COMPLETIONS, {"prompt": "hi", "n": 2, "best_of": 4}, "best_of", "serving.limits.max_n"),
    (COMPLETIONS, {"prompt": "hi", "n": 3, "best_of": 2}, "best_of", "less than n"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, "n", "greater than or equal to 1"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "best_of": 2}, "best_of", "Extra inputs"),
])
def test_choices_beyond_the_cap_or_inconsistent_are_400s_naming_the_field(
        client: TestClient, path: str, body: dict, param: str, words: str) -> None:
    reply = client.post(path, json={"max_tokens": 1, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error


def test_n_choices_come_back_indexed_with_summed_usage(client: TestClient) -> None:
    one = client.post(COMPLETIONS, json={"prompt": "the quick", "max_tokens": 2, "seed": 3}).json()
    reply = client.post(COMPLETIONS, json={"prompt": "the quick", "max_tokens": 2, "seed": 3, "n": 3}).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["choices"][0]["text"] == one["choices"][0]["text"]  # choice 0 keeps the request's seed
    assert reply["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert reply["usage"]["completion_tokens"] == 3 * 2  # max_new_tokens 2 and no EOS that early: length
    echo = client.post(COMPLETIONS, json={"prompt": "the quick", "max_tokens": 0, "echo": True, "n": 2}).json()
    assert [(c["index"], c["text"]) for c in echo["choices"]] == [(0, "the quick"), (1, "the quick")]
