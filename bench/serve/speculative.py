"""Speculative decoding benchmark: n-gram prompt lookup against plain decoding, one stream, the same job.

    PYTHONPATH=src python -m bench.serve.speculative          # Llama-1.1B shape, bf16, one GPU
    python -m bench.serve.speculative --tiny                   # a 2-layer model on the CPU (a check)

The workload is code editing's: the output re-types a block the prompt holds. With random weights
a model copies nothing it is asked to, so the block is made of the model's own greedy output: a
random seed ``S`` (``seed`` tokens) and its greedy continuation ``G`` (``new`` tokens) form the
block ``B = S + G``; the request is ``B + S`` ("here is the file; now write it again"), ``new``
greedy tokens. A model that continues ``S`` as it did before re-types ``G``, as a real model asked
to repeat or lightly edit a block re-types most of it. A random-weight model's greedy output also
falls into loops of its own (``G`` then holds them too), so how much the output copies is recorded
two ways: ``copied_fraction`` (tokens equal to ``G``'s at the same position) and
``span_copied_fraction`` (tokens ending a 3-gram the prompt holds, at any offset), with the
acceptance rate (accepted / proposed guesses) and the tokens emitted per target forward, so the
speedup can be read against the copy rate that produced it. Both engines must emit the same
tokens (``greedy_identical``: 1.0 on the CPU; on a GPU the verify forward batches k + 1 positions
where plain decoding runs one, so bf16 rounding may flip a near-tie of a random-weight model).

Both engines: one request at a time (``max_batch_size`` 1), ``ignore_eos``, CUDA graphs for the
plain decode step (speculation keeps them for steps with no guess). Rows go to
``OUT/serve_speculative.jsonl``. Needs only torch, transformers, triton and pydantic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import LLAMA_1B, LLAMA_TINY, random_llama, random_prompts, word_tokenizer
from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Engine, SamplingParams

BENCH = "serve_speculative"


@dataclass(frozen=True)
class Workload:
    shape: dict
    seed: int  # random tokens starting the block
    new: int  # the block's greedy continuation, and the tokens asked for
    requests: int  # timed requests (different seeds), one at a time
    num_tokens: tuple[int, ...]  # k values measured

    @property
    def tag(self) -> str:
        return f"ngram_copy_{self.seed + self.new}"


FULL = Workload(LLAMA_1B, seed=64, new=256, requests=3, num_tokens=(4, 8))
TINY = Workload(LLAMA_TINY, seed=16, new=48, requests=3, num_tokens=(4,))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def workload(plain: Engine, w: Workload, seed: int) -> tuple[list[int], list[int]]:
    """(the request's prompt ``S + G + S``, the block's continuation ``G``) for one random seed."""
    start = random_prompts(1, w.seed, w.shape["vocab_size"], seed=seed)[0]
    params = SamplingParams(max_tokens=w.new, temperature=0, ignore_eos=True)
    block = list(plain.generate([start], params)[0].token_ids)
    return start + block + start, block


def span_copied(prompt: list[int], output: tuple[int, ...], n: int = 3) -> float:
    """Fraction of ``output``'s tokens that end an ``n``-gram found in ``prompt``."""
    grams = {tuple(prompt[i : i + n]) for i in range(len(prompt) - n + 1)}
    text = [*prompt[-(n - 1) :], *output]
    return sum(tuple(text[i : i + n]) in grams for i in range(len(output))) / max(1, len(output))


def timed(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, list[tuple[int, ...]]]:
    """Output tokens/s over ``prompts`` run one after the other, and their tokens."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    tokens, total = [], 0.0
    for prompt in prompts:
        _sync()
        begin = time.perf_counter()
        tokens.append(engine.generate([prompt], params)[0].token_ids)
        _sync()
        total += time.perf_counter() - begin
    return sum(len(t) for t in tokens) / total, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "a 2-layer model on the CPU, a 64-token block: a check of this script")
    args = parser.parse_args()
    out = out_dir(args)
    w = TINY if args.tiny else FULL
    dev, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (--tiny check)"
    command = "PYTHONPATH=src python -m bench.serve.speculative" + (" --tiny" if args.tiny else "")
    model, tokenizer = random_llama(w.shape, dev, dtype), word_tokenizer(w.shape["vocab_size"])
    one = {"scheduler": {"max_batch_size": 1, "max_queue": 64}, "max_new_tokens": w.new}
    plain = Engine(model, tokenizer, ServingConfig(**one))
    try:
        cases = [workload(plain, w, seed=10 + r) for r in range(w.requests)]
        prompts = [prompt for prompt, _ in cases]
        base_tok_s, base_tokens = timed(plain, prompts, w.new)
    finally:
        plain.close()
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None) -> None:
        figures[metric] = value
        record(BENCH, metric, value, unit, baseline, baseline_value, device=device, command=command, out_dir=out)

    what = (f"one stream, prompt {len(prompts[0])} tokens (block of {w.seed}+{w.new}, then its {w.seed}-token "
            f"start), {w.new} greedy tokens")
    put(f"{w.tag}_plain_tok_s", base_tok_s, f"output tokens/s, {what}")
    copied = [sum(a == b for a, b in zip(t, block)) / len(block) for t, (_, block) in zip(base_tokens, cases)]
    put(f"{w.tag}_copied_fraction", statistics.fmean(copied), "fraction of output tokens equal to the block's "
        "(same position)")
    spans = [span_copied(prompt, t) for prompt, t in zip(prompts, base_tokens)]
    put(f"{w.tag}_span_copied_fraction", statistics.fmean(spans), "fraction of output tokens ending a 3-gram "
        "that the prompt holds (copied spans, at any offset)")
    for k in w.num_tokens:
        spec = Engine(model, tokenizer, ServingConfig(**one, speculative={"method": "ngram", "num_tokens": k}))
        try:
            tok_s, tokens = timed(spec, prompts, w.new)
            stats = spec.speculator.stats if spec.speculator is not None else {}
        finally:
            spec.close()
        put(f"{w.tag}_ngram_k{k}_tok_s", tok_s, f"output tokens/s, {what}", "plain decoding, same job", base_tok_s)
        put(f"{w.tag}_ngram_k{k}_speedup", tok_s / base_tok_s, "x plain decoding (same job)")
        put(f"{w.tag}_ngram_k{k}_acceptance", stats["accepted"] / max(1, stats["proposed"]),
            "accepted / proposed guesses")
        put(f"{w.tag}_ngram_k{k}_tokens_per_verify",
            (stats["accepted"] + stats["verify_steps"]) / max(1, stats["verify_steps"]),
            "tokens emitted per verify forward (accepted guesses + 1)")
        put(f"{w.tag}_ngram_k{k}_greedy_identical", sum(a == b for a, b in zip(tokens, base_tokens)) / len(tokens),
            "fraction of requests with the same tokens as plain decoding")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=1))
    print(f"records in {out}")
    return 0


if __name__ == "__main__":
    run(main)
