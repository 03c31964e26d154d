"""Structured output's checks at the edge: the request shape, the schema checks, the grammar cache and
the mask on a row of logits (no server; the HTTP and decoding paths are in
tests/integration/test_serving_structured.py)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from lmforge.serving.api.protocol import ChatCompletionRequest
from lmforge.serving.engine.requests import RequestError
from lmforge.serving.engine.sampling import ResponseFormat, SamplingParams
from lmforge.serving.engine.structured import Grammars, GrammarState, accept_tokens, check_schema, mask_logits, unenforced

OBJECT = {"type": "object", "properties": {"not": {"type": "integer"}, "tags": {
    "type": "array", "items": {"type": "string", "maxLength": 3}}}, "required": ["not"]}


def _chat(response_format: object, **extra: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                 "response_format": response_format, **extra})


def test_request_shape_becomes_a_response_format() -> None:
    body = _chat({"type": "json_schema", "json_schema": {"name": "thing", "schema": OBJECT, "strict": True}})
    params = body.sampling(8, None)
    assert params.response_format == ResponseFormat("json_schema", json.dumps(OBJECT))
    assert _chat({"type": "text"}).sampling(8, None).response_format is None
    assert _chat({"type": "json_object"}).sampling(8, None).response_format == ResponseFormat("json_object")


@pytest.mark.parametrize(("response_format", "extra", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, {}, "needs json_schema.schema"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, {}, "send type json_schema"),
    ({"type": "xml"}, {}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, {}, "pattern"),
    ({"type": "json_object"}, {"stop": ["}"]}, "stop: cannot be combined"),
    ({"type": "json_object"}, {"ignore_eos": True}, "ignore_eos: cannot be combined"),
])
def test_request_shape_refusals(response_format: dict, extra: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        _chat(response_format, **extra)


def test_sampling_params_refuse_stop_with_a_format() -> None:
    with pytest.raises(ValueError, match="stop strings"):
        SamplingParams(stop=("}",), response_format=ResponseFormat("json_object"))


def test_unenforced_keywords_are_found_in_subschemas_not_in_names() -> None:
    # "not" here is a property's name, not the keyword; maxLength under items is the keyword.
    assert unenforced(OBJECT) == ["#/properties/tags/items/maxLength lets the grammar engine write raw control "
                                  "characters into the string (invalid JSON)"]
    found = unenforced({"anyOf": [{"type": "integer", "multipleOf": 2}], "$defs": {"d": {"uniqueItems": True}}})
    assert sorted(found) == ["#/$defs/d/uniqueItems is ignored by the grammar engine",
                             "#/anyOf/0/multipleOf is ignored by the grammar engine"]
    assert unenforced({"enum": [{"not": 1}], "const": {"allOf": 2}}) == []


@pytest.mark.parametrize(("schema", "words"), [
    ('{"type": "objekt"}', "malformed at #/type"),
    ('{"properties": {"a": {"minimum": "3"}}}', "malformed at #/properties/a/minimum"),
    ("[1, 2]", "must be an object"),
    ('{"oneOf": [{"type": "integer"}]}', "use anyOf"),
])
def test_check_schema_names_the_fault(schema: str, words: str) -> None:
    with pytest.raises(RequestError, match=words) as caught:
        check_schema(schema)
    assert caught.value.param == "response_format.json_schema.schema"


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_assets import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def test_grammars_cache_and_translate_errors(grammars: Grammars) -> None:
    fmt = ResponseFormat("json_schema", json.dumps({"enum": ["yes", "no"]}))
    assert grammars.compile(fmt) is grammars.compile(fmt)
    bad = ResponseFormat("json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}))
    with pytest.raises(RequestError, match="cannot be compiled into a grammar") as caught:
        grammars.compile(bad)
    assert "/project/" not in caught.value.cause and not caught.value.cause.split(": ", 1)[1].startswith("[")


def test_mask_leaves_free_rows_and_ends_at_eos(grammars: Grammars, tokenizer) -> None:
    state = GrammarState(grammars.compile(ResponseFormat("json_schema", json.dumps({"enum": ["yes", "no"]}))))
    chosen: list[int] = []
    torch.manual_seed(0)
    while not state.matcher.is_terminated():
        logits = torch.randn(2, len(tokenizer))
        free = logits[1].clone()
        mask_logits(logits, [state, None])
        assert torch.equal(logits[1], free)
        token = int(logits[0].argmax())
        chosen.append(token)
        accept_tokens([state, None], [token, 7])
    assert chosen[-1] == tokenizer.eos_token_id
    assert json.loads(tokenizer.decode(chosen[:-1])) in ("yes", "no")
