"""Prefix-caching benchmark: 32 requests sharing a 1,024-token prefix, mean time to first token and
throughput with ``serving.kv_cache.prefix_caching`` on against off, the same engine settings, one job.

    PYTHONPATH=src python -m bench.serve.prefix          # Llama-1.1B shape, bf16, one GPU
    python -m bench.serve.prefix --tiny                   # a 2-layer model on the CPU (a check)

Each request is the shared prefix plus a suffix of its own (32 tokens), then 128 greedy tokens; the
32 are submitted at once (one burst under ``Engine.admission_held``: admitted at the same step, the
engine's running batch holds them all, so the schedule does not depend on thread timing). Two cases:

- ``cold``: the prefix is new to the server (a fresh random prefix for every timed run). With
  caching, the first request prefills it and the others borrow its blocks while they are written
  (``model/kv_cache.py``) and prefill only their suffixes, in the same forward when the step's
  token budget (``serving.scheduler.max_prefill_tokens``) holds them; without, every request
  prefills it all.
- ``warm``: one earlier request carried the prefix (a system prompt the server has seen), so with
  caching every request of the burst finds it cached.

Time to first token is the engine's own measure (request arrival to its first token, read from its
metrics hook); throughput is output tokens over the burst's wall time. Correctness in the same run:
the greedy tokens with caching on are compared with those with it off (the fraction of requests
whose tokens are identical is recorded: 1.0 on the CPU; on a GPU the two runs batch their prefills
differently, so bf16 rounding may flip a near-tie of a random-weight model), and the fraction of
prompt tokens found in the cache is recorded, as is the number of prefill forwards a burst took (a
count, the same on any machine: why the TTFT moves). The ``--tiny`` times are medians of 5 bursts
and still noisy on a busy CPU, and there the cold TTFT understates the GPU's gain: the CPU's PyTorch
attention (``model/ops.py``) pads every sequence of a forward to the longest chunk in it, so the
one forward of a 136-token writer and 31 8-token suffixes took 31 ms against 8 + 12 ms for the two
apart (the Triton kernels pad nothing). Rows go to ``OUT/serve_prefix.jsonl``. Needs only torch,
transformers, triton and pydantic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import LLAMA_1B, LLAMA_TINY, random_llama, random_prompts, word_tokenizer
from lmforge.config.serving import KVCacheConfig, SchedulerConfig, ServingConfig
from lmforge.serving.engine import Completion, Engine, SamplingParams
from lmforge.serving.engine.metrics import NullMetrics
from lmforge.serving.engine.requests import CompletionCollector

BENCH = "serve_prefix"


@dataclass(frozen=True)
class Workload:
    """The model's shape, the burst (requests, shared prefix, own suffix, new tokens) and the repeats."""

    shape: dict
    requests: int
    prefix: int
    suffix: int
    new: int
    repeats: int
    memory_mb: float | None  # the KV cache, the same for both engines (None: the engine's default)

    @property
    def vocab(self) -> int:
        return self.shape["vocab_size"]

    @property
    def tag(self) -> str:
        return f"prefix_{self.requests}x{self.prefix}"


# 32 x (1,024 + 32 + 128) tokens need ~0.85 GB of bf16 cache for this shape: 4 GB is room to spare.
FULL = Workload(LLAMA_1B, requests=32, prefix=1024, suffix=32, new=128, repeats=3, memory_mb=4096)
TINY = Workload(LLAMA_TINY, requests=32, prefix=128, suffix=8, new=4, repeats=5, memory_mb=None)


class FirstTokens(NullMetrics):
    """The engine's metrics hook, keeping each request's time to first token and the prefix-cache counts."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.queried = self.cached = 0

    def tokens(self, first_token_latencies: Iterable[float], gaps: Iterable[float], count: int) -> None:
        self.ttft.extend(first_token_latencies)

    def prefix_cache(self, queried: int, cached: int) -> None:
        self.queried += queried
        self.cached += cached


@dataclass
class Case:
    """One case's timed bursts on one engine: mean TTFT and output tokens/s per burst, their completions."""

    ttft_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    prefills: list[int] = field(default_factory=list)  # prefill forwards per burst
    completions: list[Completion] = field(default_factory=list)
    queried: int = 0
    cached: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached / self.queried if self.queried else 0.0


def burst_prompts(w: Workload, seed: int) -> list[list[int]]:
    """``w.requests`` prompts: one random prefix (from ``seed``) plus a random suffix each."""
    prefix = random_prompts(1, w.prefix, w.vocab, seed=seed)[0]
    return [prefix + suffix for suffix in random_prompts(w.requests, w.suffix, w.vocab, seed=seed + 10_000)]


def timed_burst(engine: Engine, clock: FirstTokens, prompts: list[list[int]], params: SamplingParams,
                case: Case) -> None:
    clock.ttft.clear()
    queried, cached, prefills = clock.queried, clock.cached, engine.stats["prefills"]
    collector = CompletionCollector(len(prompts))
    _sync()
    start = time.perf_counter()
    with engine.admission_held():  # one burst: admitted together, whatever the threads' timing
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, params, collector.sink(i), bounded=False)
    case.completions += collector.wait()
    _sync()
    wall = time.perf_counter() - start
    case.prefills.append(engine.stats["prefills"] - prefills)
    case.ttft_s.append(statistics.fmean(clock.ttft))
    case.tokens_per_s.append(sum(c.completion_tokens for c in case.completions[-len(prompts):]) / wall)
    case.queried += clock.queried - queried
    case.cached += clock.cached - cached


def measure(model, tokenizer, w: Workload, caching: bool) -> dict[str, Case]:
    """The cold and warm cases on one engine with prefix caching ``caching``."""
    clock = FirstTokens()
    cfg = ServingConfig(scheduler=SchedulerConfig(max_batch_size=w.requests, max_queue=4096),
                        kv_cache=KVCacheConfig(prefix_caching=caching, memory_mb=w.memory_mb), max_new_tokens=w.new)
    engine = Engine(model, tokenizer, cfg, metrics=clock)
    params = SamplingParams(max_tokens=w.new, temperature=0, ignore_eos=True)
    try:
        # Warm-up: kernels, allocator and a burst's shapes (on the CPU the first burst took 5x longer), own prefix.
        timed_burst(engine, clock, burst_prompts(w, seed=1), params, Case())
        cases = {"cold": Case(), "warm": Case()}
        for r in range(w.repeats):
            timed_burst(engine, clock, burst_prompts(w, seed=100 + r), params, cases["cold"])
        for r in range(w.repeats):
            prompts = burst_prompts(w, seed=200 + r)
            engine.generate([[*prompts[0][: w.prefix], 3]], SamplingParams(max_tokens=1))  # the server saw the prefix
            timed_burst(engine, clock, prompts, params, cases["warm"])
        return cases
    finally:
        engine.close()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "a 2-layer model on the CPU, a 128-token prefix: a check of this script")
    args = parser.parse_args()
    out = out_dir(args)
    w = TINY if args.tiny else FULL
    dev, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (--tiny check)"
    command = "PYTHONPATH=src python -m bench.serve.prefix" + (" --tiny" if args.tiny else "")
    model, tokenizer = random_llama(w.shape, dev, dtype), word_tokenizer(w.vocab)
    off = measure(model, tokenizer, w, caching=False)
    on = measure(model, tokenizer, w, caching=True)
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None,
            higher_is_better: bool = True) -> None:
        figures[metric] = value
        record(BENCH, metric, value, unit, baseline, baseline_value, device=device, command=command,
               higher_is_better=higher_is_better, out_dir=out)

    what = f"{w.requests} requests sharing a {w.prefix}-token prefix (+{w.suffix} own, {w.new} new tokens)"
    for name in ("cold", "warm"):
        ours, base = on[name], off[name]
        put(f"{w.tag}_{name}_mean_ttft_ms", 1000 * statistics.median(ours.ttft_s), f"ms, mean over {what}",
            "prefix_caching off", 1000 * statistics.median(base.ttft_s), higher_is_better=False)
        put(f"{w.tag}_{name}_output_tok_s", statistics.median(ours.tokens_per_s), f"output tokens/s, {what}",
            "prefix_caching off", statistics.median(base.tokens_per_s))
        put(f"{w.tag}_{name}_hit_rate", ours.hit_rate, "fraction of prompt tokens found in the prefix cache")
        put(f"{w.tag}_{name}_prefill_forwards", statistics.median(ours.prefills), f"prefill forwards per burst, {what}",
            "prefix_caching off", statistics.median(base.prefills), higher_is_better=False)
    pairs = [(a.token_ids, b.token_ids) for name in ("cold", "warm") for a, b in zip(on[name].completions,
                                                                                     off[name].completions)]
    put(f"{w.tag}_greedy_identical", sum(a == b for a, b in pairs) / len(pairs),
        "fraction of requests with the same greedy tokens, caching on vs off")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=1))
    print(f"records in {out}")
    return 0


if __name__ == "__main__":
    run(main)
