"""Structured-output benchmark: decoding under a ``response_format`` grammar (xgrammar) against the
same engine unconstrained, in one job, with every finished response checked against its schema.

    PYTHONPATH=src:. python -m bench.serve.structured          # Llama-1.1B shape, bf16, one GPU
    python -m bench.serve.structured --tiny                     # a 2-layer model on the CPU (a check)

The model has random weights, so a constrained response ends as soon as the grammar lets it (EOS
after the closing brace) while a free one runs its whole ``max_tokens``: tokens/s of the generated
tokens (prefill included, as ``bench.serve.gpu`` measures) then favour the long free run. Three
figures make the comparison fair: the free run at the constrained run's own lengths (each stream's
``max_tokens`` set to what its constrained twin produced), the decode-step time with and without
masks (the median inter-token gap of the decode steps with no prefill in them, at the width most
of them ran, against the equal-lengths run at that width; read from the engine's metrics hook), and
the CPU and device cost of the masks alone: accepting a step's tokens and filling the next bitmasks
of every stream (``structured.accept_tokens``, the work the engine overlaps with the next forward),
and copying and applying them to the logits (``structured.mask_logits``, on the critical path).

Rows: ``json_schema`` (an order-history object of 7 fields: integers, numbers and strings with
bounds or patterns, an enum, a boolean, an array of objects) on all N streams and on one stream,
and ``json_object`` on N streams (each with its mask costs). Every timed run has prompts of its own,
so the prefix cache never skips a prefill one run shares with another. Correctness in the same run:
every ``finish_reason: stop`` response of every timed run must parse and validate (jsonschema); the
counts of stop, length and invalid are recorded, and an invalid one fails the run (exit 1) after the
records are written.

The tokenizer is a byte-level BPE of the model's vocabulary size trained here on the Python standard
library's own sources (no hub, a few seconds), so xgrammar sees a realistic vocabulary of 32,000
multi-byte tokens, not a word list that cannot spell JSON. Needs torch, transformers, triton,
pydantic, xgrammar and jsonschema only (no Ray, MLflow or Prefect on this path).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import LLAMA_1B, LLAMA_TINY, random_llama, random_prompts
from lmforge.config.serving import SchedulerConfig, ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.engine import Completion, Engine, SamplingParams
from lmforge.serving.engine.metrics import NullMetrics
from lmforge.serving.engine.sampling import ResponseFormat
from lmforge.serving.engine.structured import GrammarState, accept_tokens, mask_logits

BENCH = "serve_structured"
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "status": {"enum": ["active", "suspended", "closed"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "verified": {"type": "boolean"},
        "orders": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 20},
                           "price": {"type": "number", "minimum": 0, "maximum": 10000}},
            "required": ["sku", "quantity", "price"], "additionalProperties": False}},
    },
    "required": ["id", "name", "email", "status", "score", "verified", "orders"],
    "additionalProperties": False,
}
FORMATS = {"json_schema": ResponseFormat("json_schema", json.dumps(SCHEMA)),
           "json_object": ResponseFormat("json_object")}
CHECKERS = {kind: jsonschema.Draft202012Validator(schema)
            for kind, schema in (("json_schema", SCHEMA), ("json_object", {"type": "object"}))}


@dataclass(frozen=True)
class Workload:
    """The model's shape, the requests, the timed repeats and the tokenizer's training text."""

    shape: dict
    prompt: int
    new: int
    concurrent: int
    repeats: int
    corpus_bytes: int

    @property
    def vocab(self) -> int:
        return self.shape["vocab_size"]


FULL = Workload(LLAMA_1B, prompt=256, new=256, concurrent=64, repeats=3, corpus_bytes=12_000_000)
TINY = Workload(LLAMA_TINY, prompt=16, new=256, concurrent=4, repeats=1, corpus_bytes=400_000)


def bpe_tokenizer(vocab_size: int, corpus_bytes: int):
    """A byte-level BPE of ``vocab_size`` entries (``<pad>``, ``<s>``, ``</s>`` are ids 0, 1, 2, as
    :func:`random_llama` configures) trained on the first ``corpus_bytes`` of the stdlib's sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts() -> Iterable[str]:
        seen = 0
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if {"site-packages", "test", "tests"} & set(path.parts):
                continue
            text = path.read_text(errors="replace")
            yield text
            seen += len(text)
            if seen >= corpus_bytes:
                return

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class StepClock(NullMetrics):
    """The engine's metrics hook, keeping what decode-step time needs: per clean decode step, the rows
    that got a token and their inter-token gaps (a null object otherwise: nothing else is collected).

    A decode step is clean when no prefill ran in the same engine step: a prefill reports its first
    tokens (and admits requests, reported by ``prefix_cache``) before the decode round reports its
    gaps, which then include the prefill's forward. Ramp-up steps are such; so were json_object's
    "18 ms steps" (H100, before this measure): many of its answers are ``{}`` in 2 tokens, so the full
    batch only ran during the ramp-up, and the widest step measured was a prefill's. (A prompt longer
    than a prefill chunk prefills through steps that report nothing: not one of this bench's.)"""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []
        self._prefilled = False

    def prefix_cache(self, queried: int, cached: int) -> None:
        self._prefilled = True

    def tokens(self, first_token_latencies: Iterable[float], gaps: Iterable[float], count: int) -> None:
        firsts, gaps = list(first_token_latencies), list(gaps)
        if firsts:  # a prefill's first tokens: this engine step's decode round waited for it
            self._prefilled = True
        elif self._prefilled:
            self._prefilled = False
        elif gaps:
            self.steps.append((count, gaps))

    def step_ms(self, width: int | None = None) -> tuple[int, float]:
        """(rows, median gap in ms) of the clean decode steps of ``width`` rows (the width present
        nearest to it), or of the width most steps ran (the steady batch) when ``width`` is None."""
        widths = collections.Counter(count for count, _ in self.steps)
        if not widths:
            return 0, float("nan")
        if width is None:
            width = max(widths, key=lambda w: (widths[w], w))
        else:
            wanted = width
            width = min(widths, key=lambda w: (abs(w - wanted), -w))
        return width, 1000 * statistics.median(g for count, gaps in self.steps if count == width for g in gaps)


@dataclass
class Timed:
    """Timed runs: output tokens/s and decode-step ms at ``width`` rows (medians of the repeats),
    every run's completions."""

    tokens_per_s: float
    step_ms: float
    width: int
    runs: list[list[Completion]] = field(default_factory=list)

    @property
    def completions(self) -> list[Completion]:
        return [c for run in self.runs for c in run]

    @property
    def lengths(self) -> list[int]:
        """The last run's tokens per stream."""
        return [c.completion_tokens for c in self.runs[-1]]


def timed(engine: Engine, clock: StepClock, prompts: Callable[[], list[list[int]]],
          params: Sequence[SamplingParams], repeats: int, width: int | None = None) -> Timed:
    """One set of ``prompts()`` per run (as many as ``params``), all submitted at once, ``repeats``
    times after an untimed warm-up (it compiles the grammar once; the engine caches it). Each run has
    prompts of its own: the prefix cache must not skip a prefill it saw in an earlier run. Decode
    steps are timed at ``width`` rows, or at the first run's steady width (:meth:`StepClock.step_ms`)."""
    engine.generate(prompts()[:1], params[:1])
    rates, steps, runs = [], [], []
    for _ in range(repeats):
        clock.steps.clear()
        batch = prompts()
        _sync()
        start = time.perf_counter()
        runs.append(engine.generate(batch, params))
        _sync()
        rates.append(sum(r.completion_tokens for r in runs[-1]) / (time.perf_counter() - start))
        width, ms = clock.step_ms(width)
        steps.append(ms)
    return Timed(statistics.median(rates), statistics.median(steps), width or 0, runs)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def verdicts(kind: str, completions: list[Completion]) -> dict[str, int]:
    """Counts of ``stop`` and ``length`` endings, and of stop responses that fail to parse or validate."""
    invalid = 0
    for completion in completions:
        if completion.finish_reason != "stop":
            continue
        try:
            CHECKERS[kind].validate(json.loads(completion.text))
        except (ValueError, jsonschema.ValidationError) as exc:
            invalid += 1
            print(f"INVALID {kind} response ({exc.__class__.__name__}): {completion.text[:300]!r}", flush=True)
    reasons = [c.finish_reason for c in completions]
    return {"stop": reasons.count("stop"), "length": reasons.count("length"), "invalid": invalid}


def mask_costs(engine: Engine, fmt: ResponseFormat, completions: list[Completion], device: str) -> dict[str, float]:
    """The masks' own cost, replaying the constrained completions' tokens through matchers: per
    step, accepting every stream's token and filling its next mask on the CPU (the engine's
    ``accept_tokens``), and applying the masks to a step's logits on the device (``mask_logits``).
    A stream that reaches its completion's end starts it again with a new matcher (a finished request
    replaced by a new one), so every step has all the streams, as many steps as the longest
    completion; medians over the steps (a new matcher's first mask, filled once per request as the
    engine does at prefill, is left out)."""
    grammar = engine.grammar_for(SamplingParams(max_tokens=1, response_format=fmt))
    assert grammar is not None
    states: list[GrammarState | None] = [GrammarState(grammar) for _ in completions]
    done = [0] * len(completions)  # tokens of its completion each stream has replayed
    logits = torch.randn(len(completions), engine.vocab_size, device=device)
    fill, apply = [], []
    for _ in range(max(len(c.token_ids) for c in completions)):
        for state in states:
            assert state is not None
            state.fill()  # a no-op but for a new matcher
        _sync()
        t0 = time.perf_counter()
        mask_logits(logits, states)
        _sync()
        t1 = time.perf_counter()
        accept_tokens(states, [c.token_ids[k] for c, k in zip(completions, done)])
        fill.append(time.perf_counter() - t1)
        apply.append(t1 - t0)
        for i, c in enumerate(completions):
            done[i] += 1
            if done[i] == len(c.token_ids):
                states[i], done[i] = GrammarState(grammar), 0
    apply[0] = statistics.median(apply)  # the first apply compiles xgrammar's Triton kernel on a GPU
    return {"fill_ms": 1000 * statistics.median(fill), "apply_ms": 1000 * statistics.median(apply),
            "steps": len(fill)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "a 2-layer model and a 512-token BPE on the CPU, 4 streams: a check of this script")
    args = parser.parse_args()
    out = out_dir(args)
    w = TINY if args.tiny else FULL
    dev, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (--tiny check)"
    command = "PYTHONPATH=src python -m bench.serve.structured" + (" --tiny" if args.tiny else "")
    n = w.concurrent

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None,
            higher_is_better: bool = True) -> None:
        record(BENCH, metric, value, unit, baseline, baseline_value, device=device, command=command,
               higher_is_better=higher_is_better, out_dir=out)
        print(json.dumps({"metric": metric, "value": round(value, 4), "baseline": baseline,
                          "baseline_value": None if baseline_value is None else round(baseline_value, 4)}),
              flush=True)

    started = time.perf_counter()
    tokenizer = bpe_tokenizer(w.vocab, w.corpus_bytes)
    print(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - started:.1f} s", flush=True)
    model = random_llama(w.shape, dev, dtype)
    clock = StepClock()
    engine = Engine(model, tokenizer, ServingConfig(scheduler=SchedulerConfig(max_batch_size=n, max_queue=4096),
                                                    max_new_tokens=w.new), metrics=clock)
    try:
        failures = measure(engine, clock, w, dev, put)
    finally:
        engine.close()
    print(f"total {time.perf_counter() - started:.0f} s; records in {out}")
    if failures:
        raise ServingError(f"{failures} constrained response(s) ended with finish_reason stop but do not validate "
                           "(printed above as INVALID)", "a grammar let invalid JSON through: report this bug")


def measure(engine: Engine, clock: StepClock, w: Workload, dev: str, put) -> int:
    """Every row of the benchmark; returns the number of finished responses that failed validation."""
    n = w.concurrent
    free = SamplingParams(max_tokens=w.new, temperature=0, ignore_eos=True)
    seeds = itertools.count(2)

    def many() -> list[list[int]]:
        return random_prompts(n, w.prompt, w.vocab, seed=next(seeds))

    def one() -> list[list[int]]:
        return random_prompts(1, w.prompt, w.vocab, seed=next(seeds))

    failures = 0
    base = timed(engine, clock, many, [free] * n, w.repeats)
    same_engine = "unconstrained, same engine (same job)"
    for kind, fmt in FORMATS.items():
        constrained = SamplingParams(max_tokens=w.new, temperature=0, response_format=fmt)
        got = timed(engine, clock, many, [constrained] * n, w.repeats)
        tag = f"{n}_streams" if kind == "json_schema" else f"{kind}_{n}_streams"
        put(f"{BENCH}_{tag}_tokens_per_s", got.tokens_per_s, f"output tok/s ({kind}, up to {w.new} new)",
            f"{same_engine}, {w.new} new tokens", base.tokens_per_s)
        put(f"{BENCH}_{tag}_mean_new_tokens", statistics.mean(got.lengths), f"tokens per response (of {w.new})")
        lengths = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in got.lengths]
        matched = timed(engine, clock, many, lengths, w.repeats, width=got.width)
        put(f"{BENCH}_{tag}_tokens_per_s_vs_same_lengths", got.tokens_per_s, f"output tok/s ({kind})",
            f"{same_engine}, each stream as long as its constrained twin", matched.tokens_per_s)
        # Steps of the same width: the equal-lengths run ramps up and drains as the constrained one does.
        put(f"{BENCH}_{tag}_decode_step_ms", got.step_ms,
            f"ms per decode step ({got.width} rows, no prefill in the step; the width most steps ran)",
            f"{same_engine}, equal lengths: decode step ms ({matched.width} rows)", matched.step_ms,
            higher_is_better=False)
        counts = verdicts(kind, got.completions)  # every timed run's
        of = f"responses of {len(got.completions)} ({w.repeats} runs)"
        for verdict, count in counts.items():
            put(f"{BENCH}_{tag}_{verdict}_responses", count,
                f"{of}: finish_reason stop that fail json.loads or jsonschema" if verdict == "invalid" else of)
        failures += counts["invalid"]
        costs = mask_costs(engine, fmt, got.runs[-1], dev)
        steps = f"median of {costs['steps']} steps"
        put(f"{BENCH}_{tag}_mask_fill_ms", costs["fill_ms"],
            f"ms per step on the CPU: accept {n} tokens + fill {n} bitmasks (xgrammar, overlapped; {steps})",
            "decode step with masks (same job)", got.step_ms, higher_is_better=False)
        put(f"{BENCH}_{tag}_mask_apply_ms", costs["apply_ms"],
            f"ms per step on {dev}: copy {n} bitmasks + apply to the logits (critical path; {steps})",
            "decode step with masks (same job)", got.step_ms, higher_is_better=False)
    base1 = timed(engine, clock, one, [free], w.repeats)
    got1 = timed(engine, clock, one, [SamplingParams(max_tokens=w.new, temperature=0,
                                                     response_format=FORMATS["json_schema"])], w.repeats)
    put(f"{BENCH}_1_stream_tokens_per_s", got1.tokens_per_s, "output tok/s (json_schema)",
        f"{same_engine}, {w.new} new tokens", base1.tokens_per_s)
    put(f"{BENCH}_1_stream_decode_step_ms", got1.step_ms, "ms per decode step (no prefill in the step)",
        f"{same_engine}: decode step ms", base1.step_ms, higher_is_better=False)
    counts = verdicts("json_schema", got1.completions)
    failures += counts["invalid"]
    put(f"{BENCH}_1_stream_invalid_responses", counts["invalid"],
        f"responses of {w.repeats} ({counts['stop']} stop): finish_reason stop that fail json.loads or jsonschema")
    return failures


if __name__ == "__main__":
    run(main)
