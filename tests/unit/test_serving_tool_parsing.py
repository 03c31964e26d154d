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
from lmforge.serving.api.json_prefix import JsonPrefix
from lmforge.serving.api.protocol import ChatCompletionRequest
from lmforge.serving.api.tool_parsers import DEFAULT_PARSER, PARSERS, CallArguments, CallEnd, CallStart, HermesParser
from lmforge.serving.api.tools import ToolOutput, ToolPlan, fallback_messages, renders_tools

NAMES = ["get_weather", "set_alarm"]
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ALARM = '<tool_call>\n{"name": "set_alarm", "arguments": {"on": true}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
         for name in NAMES]


def _parse(text: str, step: int | None = None) -> list:
    """The parser's pieces for ``text`` fed ``step`` characters at a time, each call's events folded
    into one ``(name, arguments)`` and neighbouring content joined."""
    parser, step = HermesParser(NAMES), step or len(text)
    pieces = []
    for i in range(0, len(text), step):
        pieces += parser.feed(text[i:i + step])
    folded: list = []
    for piece in pieces + parser.finish():
        if isinstance(piece, CallStart):
            folded.append((piece.name, ""))
        elif isinstance(piece, CallArguments):
            folded[-1] = (folded[-1][0], folded[-1][1] + piece.text)
        elif isinstance(piece, str) and folded and isinstance(folded[-1], str):
            folded[-1] += piece
        elif not isinstance(piece, CallEnd):
            folded.append(piece)
    return folded


@pytest.mark.parametrize(("text", "expected"), [
    ("Just text, no call.", ["Just text, no call."]),
    (WEATHER, [("get_weather", '{"city": "Paris"}')]),
    ("Let me check. " + WEATHER, ["Let me check. ", ("get_weather", '{"city": "Paris"}')]),
    (WEATHER + "\n" + ALARM, [("get_weather", '{"city": "Paris"}'), "\n", ("set_alarm", '{"on": true}')]),
    # Streamed arguments are the model's own text, spacing and escapes included.
    ('<tool_call>{ "name" :"set_alarm","arguments":{"on":true, "at": [7, -0.5e1], "note": "a\\"b\\u00e9"}}</tool_call>',
     [("set_alarm", '{"on":true, "at": [7, -0.5e1], "note": "a\\"b\\u00e9"}')]),
    # Arguments as a JSON string (as OpenAI sends them), and a last block ended by end-of-turn alone.
    ('<tool_call>{"name": "set_alarm", "arguments": "{\\"on\\": false}"}', [("set_alarm", '{"on": false}')]),
    # Keys in the other order: read whole at the closing tag.
    ('<tool_call>{"arguments": {"on": true}, "name": "set_alarm"}</tool_call>', [("set_alarm", '{"on": true}')]),
    # Not a call this request offers, not JSON, arguments not an object: the text stays content.
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>']),
    ("<tool_call>not json</tool_call> after", ["<tool_call>not json</tool_call> after"]),
    ('<tool_call>{"name": "set_alarm", "arguments": [1]}</tool_call>',
     ['<tool_call>{"name": "set_alarm", "arguments": [1]}</tool_call>']),
    ('<tool_call>{"name": "set_al', ['<tool_call>{"name": "set_al']),  # ended before it could be a call
    ("a < b and <tool_c", ["a < b and <tool_c"]),
    # A streamed call's arguments end where their JSON breaks, or where the output does.
    ('<tool_call>{"name": "set_alarm", "arguments": {"on": tru e}}</tool_call> ok', [("set_alarm", '{"on": tru'), " ok"]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa', [("get_weather", '{"city": "Pa')]),
])
def test_hermes_parser_on_crafted_outputs(text: str, expected: list) -> None:
    for step in (None, 1, 3, 7):  # fed in pieces, as a stream is: the same content and calls
        assert _parse(text, step) == expected


def test_streamed_call_starts_once_named_and_sends_arguments_as_written() -> None:
    """The name goes out as soon as it is written, the arguments piece by piece, nothing held to the end."""
    parser = HermesParser(NAMES)
    assert parser.feed('Sure. <tool_call>\n{"name": "get_weath') == ["Sure. "]
    assert parser.feed('er", "arguments": ') == []  # the arguments' brace not written yet
    assert parser.feed('{"city": "Pa') == [CallStart("get_weather"), CallArguments('{"city": "Pa')]
    assert parser.feed('ris", "days": 1') == [CallArguments('ris", "days": 1')]
    assert parser.feed('2}}\n</tool_') == [CallArguments("2}"), CallEnd()]
    assert parser.feed("call>\nDone.") == ["\nDone."]
    assert parser.finish() == []


@pytest.mark.parametrize("text", ['{"a": 1}', '{"a": [true, false, null, {"b": "\\u00e9\\n"}], "c": -0.5E+3}', "{ }",
                                  '{"s": "x\\"}"}'])
def test_json_prefix_reads_valid_objects_to_their_end(text: str) -> None:
    for step in (1, 2, len(text)):
        scan = JsonPrefix()
        for i in range(0, len(text), step):
            scan.feed(text[i:i + step])
        assert scan.done and not scan.failed and scan.read == len(text)
    scan = JsonPrefix()
    assert scan.feed(text + "} tail") == len(text) and scan.done  # nothing after the object is read


@pytest.mark.parametrize(("text", "valid"), [
    ('{"a": 01}', '{"a": 0'), ('{"a": 1.}', '{"a": 1.'), ('{"a": -}', '{"a": -'), ('{"a": tx}', '{"a": t'),
    ('{"a": "\\x"}', '{"a": "\\'), ('{"a": "\\u12g4"}', '{"a": "\\u12'), ('{"a" 1}', '{"a" '),
    ('{"a": 1,}', '{"a": 1,'), ("[1]", ""), ('{"a": "x\ny"}', '{"a": "x'), ('{"a": 1 2}', '{"a": 1 '),
])
def test_json_prefix_stops_at_the_first_impossible_character(text: str, valid: str) -> None:
    scan = JsonPrefix()
    assert scan.feed(text) == len(valid) and scan.failed and not scan.done


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
                call = calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": "", "fragments": 0})
                assert piece.function.name is None or piece.id is not None  # the name comes with the id, once
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
                call["fragments"] += bool(piece.function.arguments)
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
        if step == 1:  # one fragment per piece of output: '{"city": "Paris"}' is 17 pieces
            assert calls[0]["fragments"] == len('{"city": "Paris"}')


def test_no_call_keeps_text_and_finish() -> None:
    out = ToolOutput(HermesParser(NAMES), True)
    assert out.message("plain <b>answer</b>").model_dump() == {"role": "assistant", "content": "plain <b>answer</b>",
                                                               "tool_calls": None}
    assert out.finish_reason("stop") == "stop" and out.finish_reason("length") == "length"
    assert out.ends_output() is None  # parallel calls: the engine is never told to stop


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    message = ToolOutput(HermesParser(NAMES), parallel=False).message(WEATHER + "\nmore text\n" + ALARM)
    assert [c.function.name for c in message.tool_calls or ()] == ["get_weather"] and message.content is None
    content, calls, _ = _reassembled(WEATHER + "\nmore text\n" + ALARM, 4, parallel=False)
    assert [c["name"] for c in calls] == ["get_weather"] and content == ""


def test_parallel_tool_calls_false_ends_the_output_after_the_first_call() -> None:
    """The engine's hook says stop on the piece that closes the first call's arguments, not before."""
    ends = ToolOutput(HermesParser(NAMES), parallel=False).ends_output()
    assert ends is not None
    text = "Let me see. " + WEATHER + "\n" + ALARM
    closing = text.index('"Paris"}') + len('"Paris"}')  # the arguments' closing brace
    fired = [i for i in range(len(text)) if ends(text[i])]
    assert fired[0] == closing - 1  # (the engine ends the output there; later calls would fire again)


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
