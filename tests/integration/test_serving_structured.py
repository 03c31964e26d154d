"""Structured output (``response_format``) through the official ``openai`` client, and on both backends.

A real uvicorn server on loopback in front of a tiny random Llama on CPU: constrained decoding makes
even a random model write JSON. Every response that ends with ``finish_reason: stop`` must parse and
validate against its schema (``jsonschema``); one cut by max_tokens (``length``) need not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
from helpers import make_tiny_model_dir, openai_client, served
from pydantic import BaseModel

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.sampling import ResponseFormat

SCHEMAS = {
    "object_required": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"}}, "required": ["color", "count", "ok"]},
    "enum": {"enum": ["yes", "no", "maybe"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 4},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                   "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                  "required": ["x", "y"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["point", "tags"]},
}
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def _format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-structured"))


@pytest.fixture(scope="module")
def url(model_dir: Path) -> Iterator[str]:
    with served(model_dir, ServingConfig(max_new_tokens=80)) as (base, _, _):
        yield base


@pytest.fixture()
def client(url: str) -> openai.OpenAI:
    return openai_client(url, timeout=30)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(client: openai.OpenAI, name: str) -> None:
    finishes = []
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, seed=seed,
                                               response_format=_format(name))
        choice = reply.choices[0]
        finishes.append(choice.finish_reason)
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), SCHEMAS[name])
    assert "stop" in finishes, finishes


def test_json_object_on_completions_is_an_object(client: openai.OpenAI) -> None:
    stops = 0
    for seed in range(6):
        reply = client.completions.create(model="tiny", prompt="The quick", max_tokens=40, seed=seed,
                                          extra_body={"response_format": {"type": "json_object"}})
        choice = reply.choices[0]
        assert choice.text.startswith("{")
        if choice.finish_reason == "stop":
            stops += 1
            assert isinstance(json.loads(choice.text), dict)
    # {"type": "text"} is no constraint: the plain completion, token for token.
    plain = client.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0)
    text = client.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0,
                                     extra_body={"response_format": {"type": "text"}})
    assert text.choices[0].text == plain.choices[0].text


def test_streamed_equals_whole_and_validates(client: openai.OpenAI) -> None:
    for seed in range(3):
        kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, "seed": seed,
                  "response_format": _format("nested")}
        whole = client.chat.completions.create(**kwargs).choices[0]
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.message.content
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
        if whole.finish_reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def test_mixed_batch_constrains_only_its_rows(url: str, client: openai.OpenAI) -> None:
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in ("The quick", "json.dumps")]

    async def burst() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        constrained = [aclient.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, seed=seed,
                                                       response_format=_format("object_required"))
                       for seed in range(4)]
        free = [aclient.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
                for p in ("The quick", "json.dumps")]
        return await asyncio.gather(*constrained, *free)

    replies = asyncio.run(burst())
    for reply in replies[:4]:
        if reply.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS["object_required"])
    assert any(r.choices[0].finish_reason == "stop" for r in replies[:4])
    assert [r.choices[0].text for r in replies[4:]] == alone  # the free rows were never masked


@pytest.mark.parametrize(("response_format", "param", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema", "malformed"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "string", "minLength": 2}}}}},
     "response_format.json_schema.schema", "#/properties/n/minLength"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "integer"}}}},
     "response_format.json_schema.schema", "#/not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
     "response_format.json_schema.schema", "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format", "needs json_schema.schema"),
    ({"type": "yaml"}, "response_format", "json_schema"),
])
def test_bad_formats_are_400_naming_the_field(client: openai.OpenAI, response_format: dict, param: str,
                                              words: str) -> None:
    for create in (lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                                          response_format=response_format),
                   lambda: client.completions.create(model="tiny", prompt="a", max_tokens=5,
                                                     extra_body={"response_format": response_format})):
        with pytest.raises(openai.BadRequestError) as caught:
            create()
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == param and words in error["message"], error


def test_stop_with_a_format_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, stop=["}"],
                                       response_format={"type": "json_object"})
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "stop"


@pytest.mark.parametrize("backend", ["hf", "paged", pytest.param("onnx", marks=pytest.mark.slow)])  # onnx: an export
def test_every_backend_masks_in_a_mixed_batch(model_dir: Path, tmp_path: Path, backend: str) -> None:
    if backend == "onnx":  # the HF backend's batching over ONNX Runtime: an export of the same model
        from lmforge.serving.export import export_onnx

        export_onnx(model_dir, tmp_path / "onnx")
        model_dir = tmp_path / "onnx"
    engine = Engine.load(model_dir, device="cpu", cfg=ServingConfig(runtime={"engine": backend}))
    try:
        assert engine.backend.name == backend
        fmt = ResponseFormat("json_schema", json.dumps(SCHEMAS["object_required"]))
        params = [SamplingParams(max_tokens=60, seed=seed, response_format=fmt, logprobs=2) for seed in range(4)]
        free = SamplingParams(max_tokens=10, temperature=0)
        results = engine.generate(["The quick"] * 5, [*params, free])
        alone = engine.generate(["The quick"], free)[0]
    finally:
        engine.close()
    for result in results[:4]:
        assert result.logprobs is not None and all(e.logprob is not None and e.logprob > float("-inf")
                                                   for e in result.logprobs)
        if result.finish_reason == "stop":
            jsonschema.validate(json.loads(result.text), SCHEMAS["object_required"])
    assert any(r.finish_reason == "stop" for r in results[:4])
    assert results[4].text == alone.text


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    """The client's own structured-output helper: it sends the model's strict schema and parses the reply."""

    class Pick(BaseModel):
        color: Literal["red", "green"]
        ok: bool
        n: int | None

    reply = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Pick, max_tokens=60, seed=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pick)
