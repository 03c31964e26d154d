"""Tool calling's pieces without a server: the Hermes parser on crafted outputs (a random model never
chooses to call on its own), whole and streamed answers, the request checks and the template fallback.
The HTTP path with forced calls is tests/integration/test_serving_tools.py."""

from __future__ import annotations

import copy
import json
from typing import get_args

import pytest
from tiny_assets import build_tokenizer

from lmforge.config.serving import ServingConfig
from lmforge.model.chat import render_chat
from lmforge.serving.api.errors import ApiError
from lmforge.serving.api.protocol import ChatCompletionRequest
from lmforge.serving.api.tool_parsers import DEFAULT_PARSER, PARSERS, HermesParser, ParsedCall
from lmforge.serving.api.tools import ToolOutput, ToolPlan, fallback_messages, renders_tools

NAMES = ["get_weather", "set_alarm"]
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ALARM = '<tool_call>\n{"name": "set_alarm", "arguments": {"on": true}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
         for name in NAMES]


def _parse(text: str, step: int | None = None) -> list:
    parser, step = HermesParser(NAMES), step or len(text)
    pieces = []
    for i in range(0, len(text), step):
        pieces += parser.feed(text[i:i + step])
    return pieces + parser.finish()


@pytest.mark.parametrize(("text", "expected"), [
    ("Just text, no call.", ["Just text, no call."]),
    (WEATHER, [ParsedCall("get_weather", '{"city": "Paris"}')]),
    ("Let me check. " + WEATHER, ["Let me check. ", ParsedCall("get_weather", '{"city": "Paris"}')]),
    (WEATHER + "\n" + ALARM, [ParsedCall("get_weather", '{"city": "Paris"}'), "\n",
                              ParsedCall("set_alarm", '{"on": true}')]),
    # Arguments as a JSON string (as OpenAI sends them), and a last block ended by end-of-turn alone.
    ('<tool_call>{"name": "set_alarm", "arguments": "{\\"on\\": false}"}', [ParsedCall("set_alarm", '{"on": false}')]),
    # Not a call this request offers, not JSON, arguments not an object: the text stays content.
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>']),
    ("<tool_call>not json</tool_call> after", ["<tool_call>not json</tool_call>", " after"]),
    ('<tool_call>{"name": "set_alarm", "arguments": [1]}</tool_call>',
     ['<tool_call>{"name": "set_alarm", "arguments": [1]}</tool_call>']),
    ("a < b and <tool_c", ["a < b and ", "<tool_c"]),
])
def test_hermes_parser_on_crafted_outputs(text: str, expected: list) -> None:
    assert _parse(text) == expected
    for step in (1, 3, 7):  # fed in pieces, as a stream is: the same content and calls
        pieces = _parse(text, step)
        assert [p for p in pieces if isinstance(p, ParsedCall)] == [p for p in expected if isinstance(p, ParsedCall)]
        assert "".join(p for p in pieces if isinstance(p, str)) == "".join(p for p in expected if isinstance(p, str))


def test_every_configurable_parser_exists() -> None:
    """serving.tool_parser offers exactly the registered formats, the default among them."""
    assert set(get_args(ServingConfig.model_fields["tool_parser"].annotation)) == set(PARSERS)
    assert ServingConfig().tool_parser == DEFAULT_PARSER


def _reassembled(text: str, step: int, parallel: bool = True) -> tuple[str, list[dict], str | None]:
    out = ToolOutput(HermesParser(NAMES), parallel)
    content, calls = "", {}
    for i in range(0, len(text), step):
        for delta in out.deltas(text[i:i + step], done=i + step >= len(text)):
            content += delta.content or ""
            for piece in delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], out.finish_reason("stop")


def test_whole_and_streamed_answers_agree() -> None:
    text = "Checking both.\n" + WEATHER + "\n" + ALARM
    message = ToolOutput(HermesParser(NAMES), True).message(text)
    assert message.content == "Checking both."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or ()] == [
        ("get_weather", '{"city": "Paris"}'), ("set_alarm", '{"on": true}')]
    for step in (1, 5, len(text)):
        content, calls, finish = _reassembled(text, step)
        assert content.strip() == "Checking both." and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == [
            ("get_weather", '{"city": "Paris"}'), ("set_alarm", '{"on": true}')]
        assert all(c["id"].startswith("call_") for c in calls)


def test_no_call_keeps_text_and_finish() -> None:
    out = ToolOutput(HermesParser(NAMES), True)
    assert out.message("plain <b>answer</b>").model_dump() == {"role": "assistant", "content": "plain <b>answer</b>",
                                                               "tool_calls": None}
    assert out.finish_reason("stop") == "stop" and out.finish_reason("length") == "length"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    message = ToolOutput(HermesParser(NAMES), parallel=False).message(WEATHER + "\n" + ALARM)
    assert [c.function.name for c in message.tool_calls or ()] == ["get_weather"]
    assert _reassembled(WEATHER + "\n" + ALARM, 4, parallel=False)[1][0]["name"] == "get_weather"


def test_forced_format_is_a_structural_tag_of_the_rendered_form() -> None:
    tag = HermesParser(NAMES).forced_format({"set_alarm": {"type": "object"}}, parallel=False)
    one = tag["format"]["tags"][0]
    assert tag["format"]["stop_after_first"] and tag["format"]["at_least_one"]
    assert one["begin"] + '{"on": true}' + one["end"] == ALARM


def _body(**extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **extra})


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": "none"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "minLength": 2}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c9", "content": "1"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_plan_refuses_with_the_field_named(extra: dict, param: str) -> None:
    with pytest.raises(ApiError) as caught:
        ToolPlan.of(_body(**extra))
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message


def test_plan_by_tool_choice() -> None:
    assert ToolPlan.of(_body()).output() is None  # no tools: nothing parsed, nothing forced
    auto = ToolPlan.of(_body(tools=TOOLS))
    assert auto.output() is not None and auto.forced is None
    assert ToolPlan.of(_body(tools=TOOLS, tool_choice="none")).output() is None  # rendered, never parsed
    named = ToolPlan.of(_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_alarm"}}))
    assert named.forced is not None and named.forced.type == "structural_tag"
    assert [t["begin"] for t in json.loads(named.forced.schema or "")["format"]["tags"]] == [
        '<tool_call>\n{"name": "set_alarm", "arguments": ']


HISTORY = [{"role": "user", "content": "Weather?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "rain, 9 C"}]


def test_template_with_tools_renders_them() -> None:
    tokenizer = build_tokenizer()
    assert renders_tools(tokenizer)
    text = render_chat(tokenizer, HISTORY, TOOLS, add_generation_prompt=True)
    assert '"name": "get_weather"' in text and '{"city": "Oslo"}' in text and "rain, 9 C" in text


PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")  # renders no tools, calls or tool ids


def test_template_without_tools_gets_the_fallback() -> None:
    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.chat_template = PLAIN
    assert not renders_tools(tokenizer)
    tokenizer.chat_template = None
    assert not renders_tools(tokenizer)  # no template: the engine refuses the chat itself, by name
    messages = fallback_messages(HermesParser(NAMES), HISTORY, TOOLS)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"name": "set_alarm"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert messages[3]["content"] == "<tool_response>\nrain, 9 C\n</tool_response>"
    tokenizer.chat_template = PLAIN
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    assert "rain, 9 C" in text and text.endswith("assistant: ")
