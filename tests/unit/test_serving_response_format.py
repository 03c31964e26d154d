"""Structured output's checks at the edge: the request shape, the schema checks, the grammar cache and
the mask on a row of logits (no server; the HTTP and decoding paths are in
tests/integration/test_serving_structured.py)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from lmforge.serving.api.protocol import ChatCompletionRequest
from lmforge.serving.engine.errors import RequestError
from lmforge.serving.engine.sampling import ResponseFormat, SamplingParams
from lmforge.serving.engine.structured import (
    Grammars,
    GrammarState,
    accept_tokens,
    check_schema,
    fill_threads,
    mask_logits,
    unenforced,
)

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


# The batch mask path: masks filled together into a reused batch bitmask, applied in one kernel call.
SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                     "required": ["name", "n"]})


def _reference_logits(logits: torch.Tensor, states: list, refs: list, vocab: int) -> torch.Tensor:
    """``logits`` masked row by row from one-matcher fills (``refs``, fed the same tokens): what the
    batch path must produce, padded ids included."""
    import xgrammar

    want = logits.clone()
    for i, (state, ref) in enumerate(zip(states, refs)):
        if state is None:
            continue
        mask = xgrammar.allocate_token_bitmask(1, vocab)
        ref.fill_next_token_bitmask(mask)
        row = want[i : i + 1, :vocab]
        xgrammar.apply_token_bitmask_inplace(row, mask, vocab_size=vocab)
        want[i, vocab:] = float("-inf")
    return want


@pytest.mark.parametrize("pad", [0, 11])
def test_batch_masks_equal_single_fills_on_row_subsets(tokenizer, pad: int) -> None:
    """Constrained rows among free ones, which rows changing between steps (a sequence leaving, one
    joining), and a head wider than the grammar's vocabulary (325 ids: the last bitmask word is partial)."""
    import xgrammar

    vocab = len(tokenizer) + 5
    grammar = Grammars(tokenizer, vocab, {tokenizer.eos_token_id}).compile(ResponseFormat("json_schema", SCHEMA))
    states = [GrammarState(grammar) for _ in range(6)]
    refs = [xgrammar.GrammarMatcher(grammar) for _ in states]
    layouts = [[0, None, 1, 2, None, 3], [0, 1, 2, 3], [0, 1, 2, 3], [None, 1, 3, 0, 4], [1, 3, 0, 4, 5]]
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        layout = layouts[min(step, len(layouts) - 1)]
        rows = [states[k] if k is not None else None for k in layout]
        row_refs = [refs[k] if k is not None else None for k in layout]
        logits = torch.randn(len(rows), vocab + pad, generator=gen)
        want = _reference_logits(logits, rows, row_refs, vocab)
        mask_logits(logits, rows)
        assert torch.equal(logits, want), f"step {step}"
        tokens = [int(row.argmax()) for row in logits]
        going = [(s, r, t) for s, r, t in zip(rows, row_refs, tokens) if s is not None and not s.matcher.is_terminated()]
        accept_tokens(rows, tokens)
        for _, ref, token in going:
            assert ref.accept_token(token)
        states = [s if not s.matcher.is_terminated() else GrammarState(grammar) for s in states]
        refs = [r if not r.is_terminated() else xgrammar.GrammarMatcher(grammar) for r in refs]


def test_the_filled_batch_bitmask_is_reused_and_rows_taken_back_keep_their_masks(grammars: Grammars, tokenizer) -> None:
    import xgrammar

    grammar = grammars.compile(ResponseFormat("json_schema", SCHEMA))
    decode = [GrammarState(grammar) for _ in range(4)]
    (open_brace,) = tokenizer.encode("{", add_special_tokens=False)
    accept_tokens(decode, [open_brace] * 4)
    assert [s.slot[1] for s in decode if s.slot] == [0, 1, 2, 3]
    batch = decode[0].slot[0] if decode[0].slot else None
    assert batch is not None and all(s.slot and s.slot[0] is batch for s in decode)
    where = batch.masks.data_ptr()
    logits = torch.zeros(4, grammar.tokenizer_info.vocab_size)
    mask_logits(logits, decode)  # the same rows in the same order: the filled bitmask as it is
    allowed = [int((row == 0).sum()) for row in logits]
    assert all(0 < n < logits.shape[1] for n in allowed)
    accept_tokens(decode, [int(row.argmax()) for row in logits])  # the next step refills the same memory
    assert decode[0].slot is not None and decode[0].slot[0] is batch and batch.masks.data_ptr() == where
    # Prefills joining: other groups take other bitmasks of the pool, then (pool full) the least held
    # one, the decode step's here; its states keep copies of their masks, equal to fresh fills.
    groups = [[GrammarState(grammar) for _ in range(5)] for _ in range(4)]
    for group in groups:
        accept_tokens(group, [open_brace] * 5)
    assert all(s.slot is None for s in decode) and groups[-1][0].slot and groups[-1][0].slot[0] is batch
    for state in decode:
        fresh = xgrammar.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
        state.matcher.fill_next_token_bitmask(fresh)
        assert state.filled and torch.equal(state.mask, fresh)


def test_fill_threads_serial_for_small_batches_and_machines() -> None:
    assert fill_threads(64, 16) == 8 and fill_threads(64, 6) == 3 and fill_threads(64, 64) == 8
    assert fill_threads(8, 16) == 1 and fill_threads(64, 2) == 1 and fill_threads(64, 3) == 1
