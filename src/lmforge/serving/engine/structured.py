"""Structured output: a request's ``response_format`` as a grammar that masks its logits every step.

The grammar engine is xgrammar (the ``structured`` extra), imported when the first constrained
request arrives, so a server that never sees one never loads it. Three parts:

- :class:`Grammars` compiles a :class:`ResponseFormat` for the engine's tokenizer: ``json_object``
  is any JSON object, ``json_schema`` JSON that follows the schema, both in compact form (no runs of
  whitespace for a model to wander in). A schema is checked against the JSON Schema meta-schema
  (jsonschema), then for the keywords xgrammar 0.2.9 accepts but does not enforce (:data:`UNENFORCED`:
  each found by decoding with random logits and validating the output), then compiled; each failure
  is a :class:`RequestError` naming ``response_format`` (HTTP 400). Compiled grammars are cached by
  schema text (an LRU here, besides xgrammar's own cache).
- :class:`GrammarState`: one request's matcher and its next-token bitmask.
- :func:`mask_logits` before sampling (every constrained row of the step in one kernel call, on the
  logits' device, after the forward: the paged backend's CUDA graphs capture the forward alone) and
  :func:`accept_tokens` after it (each matcher takes its token; then the next masks of the batch are
  filled together, on xgrammar's thread pool).

Off the critical path: with overlapped decoding (the paged backend), the engine calls
:func:`accept_tokens` after it has launched the next decode step, so the masks of step k+1 are
filled on the CPU while the device runs step k+1's forward. Without overlap (the HF and ONNX
backends) the fill runs between forwards. Left to do: a request's first mask is filled when its
prefill's logits arrive, and the bitmask goes to the device by a synchronous copy each step (a few
KB; a pinned double buffer would make it asynchronous).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmforge.core.errors import ServingError
from lmforge.core.runtime import cpu_count
from lmforge.serving.engine.requests import RequestError
from lmforge.serving.engine.sampling import ResponseFormat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from xgrammar import CompiledGrammar

PARAM = "response_format"
SCHEMA_PARAM = "response_format.json_schema.schema"
TOOLS_PARAM = "tools"

# JSON Schema keywords xgrammar 0.2.9 compiles without enforcing (its output can break them), so a
# response ending in "stop" could fail the schema: refused instead, with the reason.
UNENFORCED = {
    **dict.fromkeys(("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies"),
                    "is ignored by the grammar engine"),
    "allOf": "is not enforced by the grammar engine (merge the subschemas into one)",
    "oneOf": "is decoded as anyOf by the grammar engine (use anyOf)",
    **dict.fromkeys(("uniqueItems", "contains", "minContains", "maxContains", "multipleOf"),
                    "is ignored by the grammar engine"),
    **dict.fromkeys(("minLength", "maxLength"), "lets the grammar engine write raw control characters into "
                    "the string (invalid JSON)"),
}
# Where a schema holds subschemas: by name, in a list, or one.
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "propertyNames", "contains", "not", "if",
                  "then", "else", "unevaluatedProperties", "unevaluatedItems")
# xgrammar's messages start with a timestamp, a C++ source position and sometimes a failed check's text.
_NOISE = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


def unenforced(schema: Any, path: str = "#") -> list[str]:
    """``path/keyword: reason`` for every keyword of :data:`UNENFORCED` in ``schema`` and its subschemas
    (property names and ``enum``/``const`` values are data, not keywords)."""
    if not isinstance(schema, dict):
        return []
    found = [f"{path}/{key} {UNENFORCED[key]}" for key in schema if key in UNENFORCED]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                found += unenforced(sub, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                found += unenforced(sub, f"{path}/{key}/{i}")
    for key in _SUBSCHEMA_ONE:
        found += unenforced(schema.get(key), f"{path}/{key}")
    return found


def check_schema(text: str) -> None:
    """Raise :class:`RequestError` naming the fault when ``text`` is not a schema the grammar enforces."""
    import jsonschema

    try:
        schema = json.loads(text)
        if not isinstance(schema, dict):
            raise RequestError(f"the JSON schema must be an object, got {type(schema).__name__}",
                               "send a JSON Schema object such as {\"type\": \"object\", ...}", param=SCHEMA_PARAM)
        jsonschema.validators.validator_for(schema).check_schema(schema)
        faults = unenforced(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise RequestError(f"the JSON schema is malformed at #/{where}: {exc.message}",
                           "send a valid JSON Schema (draft 2020-12)", param=SCHEMA_PARAM) from exc
    except RecursionError as exc:
        raise RequestError("the JSON schema is nested too deeply", "send a flatter schema", param=SCHEMA_PARAM) from exc
    if faults:
        raise RequestError(f"the JSON schema uses unsupported features: {'; '.join(faults[:5])}",
                           "remove those keywords (validate them on the client)", param=SCHEMA_PARAM,
                           code="unsupported_schema")


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:
        raise RequestError("this server cannot constrain output: xgrammar is not installed",
                           "install lmforge[structured] on the server, or send no response_format", param=PARAM,
                           code="unsupported") from exc
    return xgrammar


class Grammars:
    """Compiles response formats for one tokenizer and vocabulary; thread-safe (HTTP worker threads)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: set[int],
                 cache_size: int = 256) -> None:
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self.compile = functools.lru_cache(maxsize=cache_size)(self._compile)

    def _get_compiler(self) -> Any:
        with self._lock:  # the tokenizer's info is built once, by the first constrained request
            if self._compiler is None:
                xgr = _xgrammar()
                try:
                    info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                              stop_token_ids=self._stop_ids)
                except (ValueError, RuntimeError, TypeError) as exc:  # a tokenizer xgrammar cannot read
                    raise RequestError(f"this model's tokenizer cannot drive a grammar: {exc}",
                                       "send no response_format to this model", param=PARAM,
                                       code="unsupported") from exc
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, cpu_count()))
            return self._compiler

    def _compile(self, fmt: ResponseFormat) -> CompiledGrammar:
        compiler = self._get_compiler()
        if fmt.type == "json_object":
            # Not strict: an object may hold any properties (strict mode would allow only {}).
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if fmt.type == "structural_tag":
            return self._compile_tag(compiler, fmt.schema or "")
        if fmt.schema is None:
            raise RequestError("response_format json_schema has no schema", "send json_schema.schema",
                               param=SCHEMA_PARAM)
        check_schema(fmt.schema)
        try:
            return compiler.compile_json_schema(fmt.schema, any_whitespace=False)
        except RuntimeError as exc:  # xgrammar's own refusals: unsatisfiable, unresolvable $ref, bad pattern
            reason = _NOISE.sub("", str(exc).strip().splitlines()[0])
            raise RequestError(f"the JSON schema cannot be compiled into a grammar: {reason}",
                               "fix or simplify the schema", param=SCHEMA_PARAM, code="unsupported_schema") from exc

    @staticmethod
    def _compile_tag(compiler: Any, tag: str) -> CompiledGrammar:
        # Structural tags come from forced tool calls (api/tools.py), which checked each function's
        # schema first; what xgrammar still refuses is named against the tools.
        try:
            return compiler.compile_structural_tag(tag)
        except (RuntimeError, ValueError) as exc:
            reason = _NOISE.sub("", str(exc).strip().splitlines()[0])
            raise RequestError(f"the tools' parameter schemas cannot be compiled into a grammar: {reason}",
                               "fix or simplify the schemas", param=TOOLS_PARAM, code="unsupported_schema") from exc


class GrammarState:
    """One request's grammar matcher and the bitmask of the tokens allowed next."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        xgr = _xgrammar()
        self.matcher = xgr.GrammarMatcher(grammar)
        self.vocab_size = grammar.tokenizer_info.vocab_size
        self.mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.filled = False

    def fill(self) -> None:
        if not self.filled:
            self.matcher.fill_next_token_bitmask(self.mask, 0)
            self.filled = True

    def accept(self, token: int, fill: bool = True) -> None:
        """Advance past ``token`` and (with ``fill``) fill the next mask unless the grammar has ended."""
        if not self.matcher.accept_token(token):  # cannot happen for a token sampled under the mask
            raise ServingError(f"the grammar refused token {token} chosen under its own mask", "report this bug")
        self.filled = False
        if fill and not self.matcher.is_terminated():
            self.fill()


def mask_logits(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Set to -inf, in place, every logit a row's grammar does not allow next (rows without one stay)."""
    rows = [i for i, state in enumerate(states) if state is not None]
    if not rows:
        return
    xgr = _xgrammar()
    first = states[rows[0]]
    assert first is not None
    masks = first.mask.new_empty((len(states), first.mask.shape[1]))  # rows without a grammar are never read
    for i in rows:
        state = states[i]
        assert state is not None
        state.fill()
        masks[i] = state.mask[0]
    vocab = first.vocab_size
    if logits.shape[-1] > vocab:  # a padded head: its extra ids are never text
        logits[rows, vocab:] = float("-inf")
    xgr.apply_token_bitmask_inplace(logits, masks.to(logits.device), vocab_size=vocab, indices=rows)


def accept_tokens(states: Sequence[GrammarState | None], tokens: Sequence[int]) -> None:
    """Each grammar takes its row's chosen token and fills its mask for the next step (several masks
    at once on xgrammar's thread pool)."""
    going = []
    for state, token in zip(states, tokens):
        if state is not None:
            state.accept(token, fill=False)
            if not state.matcher.is_terminated():
                going.append(state)
    if len(going) == 1:
        going[0].fill()
    elif going:
        masks = _xgrammar().allocate_token_bitmask(len(going), going[0].vocab_size)
        _batch_matcher().batch_fill_next_token_bitmask([s.matcher for s in going], masks)
        for i, state in enumerate(going):
            state.mask, state.filled = masks[i : i + 1], True


@functools.cache
def _batch_matcher() -> Any:
    return _xgrammar().BatchGrammarMatcher(max_threads=max(1, min(8, cpu_count() // 2)))
