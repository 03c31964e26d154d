"""``n`` and ``best_of`` as an OpenAI client sees them (api/choices.py), on a real server on loopback.

The official ``openai`` client against uvicorn in front of the tiny random Llama of tests/conftest.py on
CPU (paged backend, 4-token blocks so a short prompt fills several): n choices with their indexes,
seeded sampling reproducible, streams that reassemble into the same texts, usage summed, best_of
picking the candidates of highest mean token logprob (checked against the candidates' own logprobs),
the siblings reusing the first one's prompt blocks (``/metrics``), structured output and forced tool
calls per choice, and the 400s naming the field.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from helpers import metric, openai_client, served

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine.metrics import EngineMetrics

PROMPT = "def add(a, b):"
MESSAGES = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # A longer context for the tool list (rotary positions have no weights: the same model).
    model = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("choices") / "tiny"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    with served(model, ServingConfig(max_new_tokens=400, kv_cache={"block_size": 4}),
                metrics=EngineMetrics()) as (base, _, _):
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai_client(url)


def test_n_choices_are_indexed_reproducible_and_streamed_alike(client: openai.OpenAI) -> None:
    ask = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 11, "logprobs": 0}
    reply = client.completions.create(n=3, **ask)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.text for c in reply.choices]
    assert len(set(texts)) > 1  # sampled on their own, not one sample copied
    assert [c.text for c in client.completions.create(n=3, **ask).choices] == texts  # seeded: reproducible
    assert client.completions.create(**ask).choices[0].text == texts[0]  # choice 0 keeps the request's seed
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in reply.choices if c.logprobs)
    single = client.completions.create(**ask).usage
    assert single is not None and reply.usage.prompt_tokens == single.prompt_tokens  # the prompt counted once

    streamed: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    usage = None
    for chunk in client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **ask):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
    assert [streamed[i] for i in range(3)] == texts
    assert all(len(finishes[i]) == 1 for i in range(3))
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


def test_chat_n_choices_whole_and_streamed(client: openai.OpenAI) -> None:
    ask = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
    reply = client.chat.completions.create(**ask)
    assert [c.index for c in reply.choices] == [0, 1]
    streamed: dict[int, str] = defaultdict(str)
    roles = []
    for chunk in client.chat.completions.create(stream=True, **ask):
        for choice in chunk.choices:
            roles += [choice.index] if choice.delta.role else []
            streamed[choice.index] += choice.delta.content or ""
    assert sorted(roles) == [0, 1]
    assert [streamed[i] for i in range(2)] == [c.message.content for c in reply.choices]


def test_best_of_returns_the_candidates_of_highest_mean_logprob(client: openai.OpenAI) -> None:
    ask = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 23}
    # The same seeds as best_of's candidates: n=4 returns them all, with the engine's logprobs.
    every = client.completions.create(n=4, logprobs=0, **ask).choices
    mean = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every if c.logprobs}
    ranked = sorted((c.text for c in every), key=mean.__getitem__, reverse=True)
    reply = client.completions.create(n=2, best_of=4, **ask)
    assert [c.text for c in reply.choices] == ranked[:2]
    assert all(c.logprobs is None for c in reply.choices)  # recorded to rank, not reported unasked
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in every if c.logprobs)


def _metric(url: str, name: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, name)


def test_siblings_reuse_the_first_choices_prompt_blocks(client: openai.OpenAI, url: str) -> None:
    prompt = "Siblings share this prompt: the quick brown fox jumps over the lazy dog, twice over."
    cached_before = _metric(url, "lmforge_prefix_cache_cached_tokens_total")
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, n=3).usage
    assert first is not None and first.prompt_tokens_details is not None
    # Every full 4-token block before the prompt's last token (which is always recomputed).
    reusable = (first.prompt_tokens - 1) // 4 * 4
    assert reusable >= 8
    # The first choice computed the prompt; the other two, admitted with it, borrowed its blocks.
    assert _metric(url, "lmforge_prefix_cache_cached_tokens_total") - cached_before == 2 * reusable
    assert first.prompt_tokens_details.cached_tokens == 0  # the prompt, counted once, was computed once
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, n=3).usage
    assert again is not None and again.prompt_tokens_details is not None
    assert again.prompt_tokens_details.cached_tokens == reusable


def test_each_choice_follows_the_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    assert len(reply.choices) == 3
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert json.loads(choice.message.content or "")["color"] in {"red", "green", "blue"}


def test_each_choice_has_its_own_forced_tool_call(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "set_alarm", "description": "alarm", "parameters": schema}}]
    ask = {"model": "tiny", "messages": MESSAGES, "tools": tools, "max_tokens": 120, "seed": 2, "n": 2,
           "tool_choice": {"type": "function", "function": {"name": "set_alarm"}}, "parallel_tool_calls": False}
    reply = client.chat.completions.create(**ask)
    ids = set()
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schema)
        ids.add(call.id)
    assert len(ids) == 2
    finishes = [(c.index, c.finish_reason) for chunk in client.chat.completions.create(stream=True, **ask)
                for c in chunk.choices if c.finish_reason]
    assert sorted(finishes) == [(0, "tool_calls"), (1, "tool_calls")]


def test_a_client_gone_mid_stream_frees_every_choice(url: str) -> None:
    generated = _metric(url, "lmforge_generation_tokens_total")
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "n": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while _metric(url, "lmforge_running_requests") + _metric(url, "lmforge_queue_depth") > 0:
        assert time.monotonic() < deadline, "the choices of a closed stream are still decoding"
        time.sleep(0.05)
    assert _metric(url, "lmforge_generation_tokens_total") - generated < 3 * 400  # stopped, not run out


@pytest.mark.parametrize(("ask", "param"), [
    ({"n": 9}, "n"),
    ({"n": 2, "best_of": 9}, "best_of"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
])
def test_choices_the_server_refuses_are_400s_naming_the_field(client: openai.OpenAI, ask: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **ask)
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == param
    if ask.get("n") == 9 or ask.get("best_of") == 9:
        assert "serving.limits.max_n" in body["message"]
