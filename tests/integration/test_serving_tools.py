"""Tool calling in chat completions through the official ``openai`` client, against a real server.

A real uvicorn server on loopback in front of a tiny random Llama on CPU. A random model never
chooses to call a tool on its own (``auto`` is checked on crafted outputs in
tests/unit/test_serving_tool_parsing.py), but a forced call (``required`` or a named function) is
constrained by the grammar: it always comes back as ``tool_calls`` whose arguments validate
against the function's schema, whole or streamed. Every refusal is a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from helpers import make_tiny_model_dir, running

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Engine

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ALARM = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-tools"))
    # The tool list takes some 600 tokens of the tiny vocabulary: a longer context (rotary positions
    # have no weights, so the model is the same).
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    cfg = ServingConfig(max_new_tokens=200)
    engine = Engine.load(model_dir, device="cpu", cfg=cfg)
    try:
        with running(engine, cfg) as (base, _):
            yield base
    finally:
        engine.close()


@pytest.fixture()
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def _valid(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}])
def test_forced_call_validates(client: openai.OpenAI, tool_choice: str | dict) -> None:
    names = set(SCHEMAS) if tool_choice == "required" else {"set_alarm"}
    for seed in range(2):
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                               parallel_tool_calls=False, max_tokens=120, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        _valid(choice.message.tool_calls, names)


def test_forced_call_streamed_reassembles(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 120, "seed": 1,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for piece in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] += (piece.function.name or "") if piece.function else ""
            call["arguments"] += (piece.function.arguments or "") if piece.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert whole.message.tool_calls is not None
    assert calls[0]["arguments"] == whole.message.tool_calls[0].function.arguments  # same seed, same call
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_parallel_required_calls_each_validate(client: openai.OpenAI) -> None:
    complete = 0
    for seed in range(2):
        choice = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                max_tokens=200, seed=seed).choices[0]
        assert choice.message.tool_calls, choice  # the first call is always whole within 200 tokens
        _valid(choice.message.tool_calls, set(SCHEMAS))
        complete += choice.finish_reason == "tool_calls"
    assert complete  # some answer ended by itself, not cut by max_tokens


def test_history_with_calls_and_results_renders(client: openai.OpenAI) -> None:
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    for tool_choice in ("auto", "none"):
        reply = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice=tool_choice,
                                               max_tokens=5, seed=0)
        assert reply.choices[0].finish_reason in {"stop", "length"}
        assert reply.usage is not None and reply.usage.prompt_tokens > 40  # the tools and the result are in the prompt


def test_agent_round_trip(client: openai.OpenAI) -> None:
    """A forced call's message, sent back as the client library returns it, with the tool's result."""
    kwargs = {"model": "tiny", "tools": TOOLS, "max_tokens": 120, "seed": 0}
    called = client.chat.completions.create(messages=MESSAGES, tool_choice="required", parallel_tool_calls=False,
                                            **kwargs).choices[0].message
    assert called.tool_calls
    history = [*MESSAGES, called.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "sunny"}]
    reply = client.chat.completions.create(messages=history, **{**kwargs, "max_tokens": 5})
    assert reply.choices[0].finish_reason in {"stop", "length", "tool_calls"}


BAD = [
    ({"tool_choice": "auto"}, "tool_choice", "no tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "type object"),
    ({"tools": TOOLS, "messages": [*MESSAGES, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id", "'call_x'"),
    ({"tools": TOOLS, "tool_choice": "required", "stop": ["}"]}, "stop", "forced tool call"),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD)
def test_bad_tool_requests_are_400_naming_the_field(client: openai.OpenAI, extra: dict, param: str,
                                                    words: str) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**kwargs)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param and words in error["message"], error
