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
  :func:`accept_tokens` after it (the matchers take their tokens in one call; then the next masks of
  the batch are filled together, on xgrammar's thread pool where the batch and the machine are big
  enough).

Off the critical path: with overlapped decoding (``engine/steps.py``), the engine calls
:func:`accept_tokens` after it has launched the next decode step, so the masks of step t+1 are
filled on the CPU while the device runs forward t+1. They are filled into a batch bitmask reused
from step to step (pinned where CUDA is); when step t+1 runs the same rows in the same order,
:func:`mask_logits` sends that bitmask as it is, by an asynchronous copy (no per-row copies, no
wait for the forward), else it gathers the rows in one op. Without overlap (the HF and ONNX
backends) the fill runs between forwards. A request's first mask is filled when its prefill's
logits arrive (on the critical path, one matcher).
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
from lmforge.serving.engine.errors import RequestError
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
# Matchers per step from which xgrammar's thread pool fills the masks. Measured on 2 busy cores with a
# 32k-token BPE: a fill takes 1 to 20 us per matcher, handing a batch to the pool 50 to 100 us, and
# xgrammar's 1-thread batch fill beats a Python loop of single fills (69 vs 114 us for 64 matchers).
PARALLEL_FROM = 16
POOL = 4  # batch bitmasks per engine thread and vocabulary: a decode step's, and prefills' joining it
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
        # A fresh matcher's first mask depends on the grammar alone: filled once, copied into each new request's
        # state (GrammarState.started), so no request fills it on the engine's thread or under its lock.
        self.first_mask = functools.lru_cache(maxsize=cache_size)(self._first_mask)

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

    def _first_mask(self, fmt: ResponseFormat) -> torch.Tensor:
        state = GrammarState(self.compile(fmt))
        state.fill()
        return state.mask

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
    """One request's grammar matcher and the bitmask of the tokens allowed next: a row of a batch
    bitmask that :func:`accept_tokens` filled (see :class:`_Bitmasks`), or the state's own row (its
    first mask, filled at prefill, and a mask whose batch row was taken back)."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.matcher = _xgrammar().GrammarMatcher(grammar)
        self.vocab_size = grammar.tokenizer_info.vocab_size
        self.words = -(-self.vocab_size // 32)  # int32 words of its bitmask
        self.filled = False
        self.slot: tuple[_Bitmasks, int] | None = None  # (batch bitmask, row) holding the filled mask
        self._own: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """The (1, ceil(vocab_size / 32)) int32 bitmask of the tokens allowed next (valid once filled)."""
        if self.slot is not None:
            batch, row = self.slot
            return batch.masks[row : row + 1]
        if self._own is None:
            self._own = _xgrammar().allocate_token_bitmask(1, self.vocab_size)
        return self._own

    @classmethod
    def started(cls, grammar: CompiledGrammar, first_mask: torch.Tensor) -> GrammarState:
        """A new request's state, its first mask a copy of ``first_mask`` (``Grammars.first_mask``)."""
        state = cls(grammar)
        state._own, state.filled = first_mask.clone(), True
        return state

    def fill(self) -> None:
        if not self.filled:
            self.slot = None
            self.matcher.fill_next_token_bitmask(self.mask, 0)
            self.filled = True

    def keep_own_copy(self) -> None:
        """Move a filled mask out of its batch row, which another fill is about to take."""
        if self.slot is not None:
            mask = self.mask.clone()
            self.slot, self._own = None, mask


class _Bitmasks:
    """A batch bitmask that :func:`accept_tokens` fills, reused from step to step instead of allocated:
    row i is ``owners[i]``'s mask while that state's ``slot`` still names it. In pinned memory where
    CUDA is, so that :func:`mask_logits` copies it to the device asynchronously straight from here;
    ``copied`` marks that copy, which a refill waits for (it has run long before: the step's tokens,
    sampled after it, are on the host when the next fill starts)."""

    def __init__(self, rows: int, words: int) -> None:
        self.masks = torch.empty((rows, words), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        self.owners: list[GrammarState] = []
        self.copied: torch.cuda.Event | None = None

    def holders(self) -> list[GrammarState]:
        return [s for i, s in enumerate(self.owners) if s.slot is not None and s.slot[0] is self and s.slot[1] == i]

    def held(self) -> bool:
        return any(s.slot is not None and s.slot[0] is self and s.slot[1] == i for i, s in enumerate(self.owners))

    def take(self, states: list[GrammarState]) -> torch.Tensor:
        """Rows 0..len(states) for ``states``' next masks (their slots point here); the rows to fill."""
        for state in self.holders():  # only when the pool was full: the fewest rows still held were chosen
            state.keep_own_copy()
        if self.masks.shape[0] < len(states):
            self.masks = torch.empty((len(states), self.masks.shape[1]), dtype=torch.int32,
                                     pin_memory=self.masks.is_pinned())
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        self.owners = states
        for i, state in enumerate(states):
            state.slot = (self, i)
        return self.masks[: len(states)]


_local = threading.local()  # each engine steps in its own thread: the pools are never shared


def _bitmasks(rows: int, words: int) -> _Bitmasks:
    """A batch bitmask of this thread's pool no state holds a row of (a new one while the pool has
    room; else the one with the fewest held rows, whose holders keep copies)."""
    pools: dict[int, list[_Bitmasks]] = _local.__dict__.setdefault("pools", {})
    pool = pools.setdefault(words, [])
    for batch in pool:
        if not batch.held():
            return batch
    if len(pool) < POOL:
        pool.append(_Bitmasks(max(rows, 64), words))
        return pool[-1]
    return min(pool, key=lambda b: len(b.holders()))


def mask_logits(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Set to -inf, in place, every logit a row's grammar does not allow next (rows without one stay):
    one bitmask for the batch (the one :func:`accept_tokens` filled, when the rows are its states in
    its order; else gathered in one op), copied to the device without waiting for the work queued
    there, applied by xgrammar's kernel. Ids past the grammar's vocabulary (a padded head) are never
    text: masked for constrained rows."""
    constrained = [s for s in states if s is not None]
    if not constrained:
        return
    for state in constrained:
        state.fill()  # a no-op but for a first mask
    vocab, cuda = constrained[0].vocab_size, logits.device.type == "cuda"
    batch = _filled_batch(states)
    host = batch.masks[: len(states)] if batch is not None else _gather(states, cuda)
    width = logits.shape[-1]
    if width > vocab:
        host, batch = _widen(host, [i for i, s in enumerate(states) if s is None], vocab, width, cuda), None
    if cuda:
        host = host.to(logits.device, non_blocking=True)
        if batch is not None:  # its next fill must wait for this copy
            batch.copied = torch.cuda.Event()
            batch.copied.record()
    _xgrammar().apply_token_bitmask_inplace(logits, host, vocab_size=width)


def _filled_batch(states: Sequence[GrammarState | None]) -> _Bitmasks | None:
    """The batch bitmask whose rows 0..len(states) are exactly ``states``' masks, if there is one."""
    first = states[0]
    if first is None or first.slot is None:
        return None
    batch = first.slot[0]
    if all(s is not None and s.slot is not None and s.slot[0] is batch and s.slot[1] == i
           for i, s in enumerate(states)):
        return batch
    return None


def _gather(states: Sequence[GrammarState | None], pin: bool) -> torch.Tensor:
    """One (rows, words) bitmask of ``states``' masks, all ones (every token allowed) for rows without
    a grammar, in pinned memory for a device copy (torch's caching host allocator keeps it until its
    copy has run)."""
    first = next(s for s in states if s is not None)
    ones = _ones(first.mask.shape[1])
    out = torch.empty((len(states), first.mask.shape[1]), dtype=torch.int32, pin_memory=pin)
    return torch.cat([s.mask if s is not None else ones for s in states], out=out)


@functools.cache
def _ones(words: int) -> torch.Tensor:
    return torch.full((1, words), -1, dtype=torch.int32)


def _widen(host: torch.Tensor, free: list[int], vocab: int, width: int, pin: bool) -> torch.Tensor:
    """``host`` as wide as logits of ``width`` columns: ids from ``vocab`` on disallowed for the
    constrained rows (xgrammar sets the last word's bits past its vocabulary), allowed for ``free``."""
    words = host.shape[1]
    wide = torch.zeros((host.shape[0], -(-width // 32)), dtype=torch.int32, pin_memory=pin)
    wide[:, :words] = host
    if vocab % 32:
        wide[:, words - 1] &= (1 << (vocab % 32)) - 1
    if free:
        wide[free] = -1
    return wide


def accept_tokens(states: Sequence[GrammarState | None], tokens: Sequence[int]) -> None:
    """Each grammar takes its row's chosen token; then the next masks of the states still going are
    filled together, into a batch bitmask reused from an earlier step, in their order (so that the
    next :func:`mask_logits` of the same rows sends it as it is)."""
    live = [(s, t) for s, t in zip(states, tokens) if s is not None]
    if not live:
        return
    xgr = _xgrammar()
    accepted = xgr.BatchGrammarMatcher.batch_accept_token([s.matcher for s, _ in live], [t for _, t in live])
    going = []
    for (state, token), ok in zip(live, accepted):
        if not ok:  # cannot happen for a token sampled under the mask
            raise ServingError(f"the grammar refused token {token} chosen under its own mask", "report this bug")
        state.filled, state.slot = False, None
        if not state.matcher.is_terminated():
            going.append(state)
    if len(going) == 1:
        going[0].fill()
    elif going:
        rows = _bitmasks(len(going), going[0].words).take(going)
        threads = fill_threads(len(going), cpu_count())
        _batch_matcher(threads).batch_fill_next_token_bitmask([s.matcher for s in going], rows)
        for state in going:
            state.filled = True


def fill_threads(matchers: int, cores: int) -> int:
    """Threads to fill ``matchers`` masks with on ``cores`` cores: half the cores (xgrammar's advice;
    the rest run the engine and the HTTP server), at most 8, and 1 (a serial fill in this thread) for
    fewer than :data:`PARALLEL_FROM` matchers or 3 cores or fewer."""
    if matchers < PARALLEL_FROM or cores < 4:
        return 1
    return min(8, cores // 2)


@functools.cache
def _batch_matcher(threads: int) -> Any:
    return _xgrammar().BatchGrammarMatcher(max_threads=threads)
