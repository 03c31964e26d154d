"""Tool calling in chat completions through the official ``openai`` client, against a real server.

A real uvicorn server on loopback in front of a tiny random Llama on CPU. A random model never
chooses to call a tool on its own (``auto`` is checked on crafted outputs in
tests/unit/test_serving_tool_parsing.py), but a forced call (``required`` or a named function) is
constrained by the grammar: it always comes back as ``tool_calls`` whose arguments validate
against the function's schema, whole or streamed. Every refusal is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from helpers import make_tiny_model_dir, running

from lmforge.config.serving import ServingConfig
from lmforge.serving.api.protocol import ChatCompletionRequest
from lmforge.serving.api.tool_parsers import HermesParser
from lmforge.serving.api.tools import ToolOutput, ToolPlan
from lmforge.serving.engine import Engine
from lmforge.serving.engine.requests import Completion, GenerationStream
from lmforge.serving.engine.sampling import SamplingParams

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ALARM = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-tools"))
    # The tool list takes some 600 tokens of the tiny vocabulary: a longer context (rotary positions
    # have no weights, so the model is the same).
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    cfg = ServingConfig(max_new_tokens=200)
    engine = Engine.load(model_dir, device="cpu", cfg=cfg)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with running(engine, engine.cfg) as (base, _):
        yield base


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


LONG = {"type": "object", "additionalProperties": False, "required": [f"step_{i}" for i in range(4)],
        "properties": {f"step_{i}": {"enum": ["oven", "eggs", "flour"]} for i in range(4)}}


def test_long_call_streams_its_arguments_in_fragments(client: openai.OpenAI) -> None:
    """The id and name come first, then the arguments in many chunks as the model writes them, which
    concatenate to the whole answer's arguments (same seed) and to JSON that validates."""
    tools = [{"type": "function", "function": {"name": "plan_recipe", "parameters": LONG}}]
    kwargs = {"model": "tiny", "messages": MESSAGES, "tools": tools, "max_tokens": 200, "seed": 3,
              "parallel_tool_calls": False, "tool_choice": {"type": "function", "function": {"name": "plan_recipe"}}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    fragments: list[str] = []
    named_first = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for piece in chunk.choices[0].delta.tool_calls or ():
            assert piece.index == 0 and piece.function is not None
            if named_first is None:
                named_first = piece.id is not None and piece.function.name == "plan_recipe"
            else:
                assert piece.id is None and piece.function.name is None  # the id and name come once
            if piece.function.arguments:
                fragments.append(piece.function.arguments)
    arguments = "".join(fragments)
    assert named_first and len(fragments) > 10, fragments  # dozens of tokens of arguments, not one chunk
    assert arguments == whole.message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(arguments), LONG)


def test_first_call_ends_the_output_when_calls_are_not_parallel(engine: Engine) -> None:
    """``parallel_tool_calls: false`` under ``auto``: the engine stops once the first call is whole.

    A random model writes no call by itself, so the output is driven by the grammar of ``required``
    with parallel calls (one or more blocks): left alone it goes on past the first call's arguments
    (the block's end, maybe more calls); with the hook of a non-parallel answer it ends right at the
    arguments' closing brace, finish ``stop`` (``tool_calls`` for the client), fewer tokens."""
    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    plan = ToolPlan.of(body)  # parallel_tool_calls true: the grammar allows several calls
    prompt = engine.encode(plan.render(engine, [m.as_template_input() for m in body.messages]),
                           add_special_tokens=False)
    params = plan.constrain(SamplingParams(max_tokens=200, temperature=1.0, seed=5))
    free = engine.generate([prompt], params)[0]
    output = ToolOutput(HermesParser(list(SCHEMAS)), parallel=False)
    stream = asyncio.run(_stream_with(engine, prompt, params, output.ends_output()))
    assert stream.finish_reason == "stop" and stream.completion_tokens < free.completion_tokens
    assert free.text.startswith(stream.text) and "</tool_call>" in free.text[len(stream.text):]
    message = output.message(stream.text)
    assert output.finish_reason(stream.finish_reason) == "tool_calls"
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    _valid(message.tool_calls, set(SCHEMAS))
    # It ended in the token that closed the arguments: at most the start of the block's end follows them.
    after = stream.text[stream.text.index(message.tool_calls[0].function.arguments)
                        + len(message.tool_calls[0].function.arguments):]
    assert "}\n</tool_call>".startswith(after) and not after.endswith(">"), after


async def _stream_with(engine: Engine, prompt: list[int], params: SamplingParams, ends) -> Completion:
    with engine.admission_held():  # the hook is set before the engine can admit the request
        stream = GenerationStream(engine.submit, prompt, params, ends)
    return await stream.result()


def test_parallel_required_calls_each_validate(client: openai.OpenAI) -> None:
    complete = 0
    for seed in range(2):
        choice = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                max_tokens=200, seed=seed).choices[0]
        calls = choice.message.tool_calls
        assert calls, choice  # the first call is always whole within 200 tokens
        # A reply cut by max_tokens may end inside its last call's arguments (sent as written, as OpenAI's are).
        _valid(calls if choice.finish_reason == "tool_calls" else calls[:-1] or calls, set(SCHEMAS))
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
