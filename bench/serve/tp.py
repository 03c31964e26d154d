"""Tensor-parallel serving: one engine split over N GPUs (``serving.tensor_parallel``) against one GPU, same job.

    PYTHONPATH=src python -m bench.serve.tp [--worlds 1 2 4] [--shapes 1b 8b] [--out DIR]
    python -m bench.serve.tp --tiny  # CPU: two gloo ranks of a 2-layer model, a check of this script

For each model shape (Llama-1.1B, and Llama-3-8B's dimensions; random bf16 weights) it starts the plain
one-GPU engine, then a tensor-parallel engine for each world size, and measures for each: one stream and
64 concurrent streams of 256 prompt + 256 new tokens (output tokens/s, prefill included, median of three
runs), the time to start (KV cache, the workers, the weights' broadcast, graph capture) and the greedy
tokens of 4 prompts x 64 tokens against the plain engine's (the split sums in another order, so bf16
rounding may turn a near-tie: the record is the share of tokens before the first difference).

World 1 is the split machinery on one GPU: a one-rank NCCL group whose all-reduces sit in the captured
graphs and communicate nothing, the cost of the split where there is no one to split with (the engine
itself never builds it: ``tensor_parallel: 1`` is the plain backend, so this script constructs it).
World sizes beyond the visible GPUs are skipped with a note. Each figure is appended to
``OUT/serve_tp.jsonl`` (default ``bench/results``) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from unittest import mock

import torch

import lmforge.serving.engine.engine as engine_module
from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import record
from bench.common.serve import LLAMA_1B, LLAMA_TINY, engine_tokens_per_s, random_llama, random_prompts, word_tokenizer
from lmforge.config.serving import SchedulerConfig, ServingConfig
from lmforge.serving.backends.tensor_parallel import TensorParallelBackend
from lmforge.serving.engine import Engine, SamplingParams

# Llama-3-8B's dimensions (all 32 layers: 16 GB of bf16 weights fit one 80 GB GPU, the one-GPU baseline).
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
SHAPES = {"1b": LLAMA_1B, "8b": LLAMA_8B}
PROMPT, NEW, CONCURRENT = 256, 256, 64
TINY_PROMPT, TINY_NEW, TINY_CONCURRENT = 16, 8, 4
GREEDY_PROMPTS, GREEDY_NEW = 4, 64


def split_engine(model, tokenizer, cfg: ServingConfig, world: int) -> Engine:
    """The engine over ``world`` ranks; at 1, the split machinery over a one-rank group (see the docstring)."""
    if world > 1:
        return Engine(model, tokenizer, cfg.model_copy(update={"tensor_parallel": world}))
    with mock.patch.object(engine_module, "make_backend", TensorParallelBackend):  # the engine's one seam
        return Engine(model, tokenizer, cfg)


def greedy_tokens(engine: Engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    return [list(c.token_ids) for c in engine.generate(prompts, params)]


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Share of the reference's tokens that come before each sequence's first difference."""
    same = 0
    for a, b in zip(got, want):
        same += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / sum(len(b) for b in want)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], help="tensor-parallel sizes to measure")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="SHAPE", help=" ".join(SHAPES))
    add_common_arguments(parser, "a 2-layer model on the CPU over two gloo ranks: a check of this script")
    args = parser.parse_args()
    shapes = ["tiny"] if args.tiny else choose(args.shapes, SHAPES, "shape", "--shapes")
    worlds = [1, 2] if args.tiny else sorted(set(args.worlds))
    out = out_dir(args)
    dev, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    gpus = torch.cuda.device_count() if dev == "cuda" else 0
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if dev == "cuda" else "cpu (--tiny check)"
    prompt, new, concurrent = (TINY_PROMPT, TINY_NEW, TINY_CONCURRENT) if args.tiny else (PROMPT, NEW, CONCURRENT)
    command = " ".join(["PYTHONPATH=src python -m bench.serve.tp", *(["--tiny"] if args.tiny else
                        ["--worlds", *map(str, worlds), "--shapes", *shapes])])
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None) -> None:
        figures[metric] = value
        record("serve_tp", metric, value, unit, baseline, baseline_value, device=device, command=command, out_dir=out)
        print(json.dumps({"metric": metric, "value": round(value, 4), "baseline": baseline,
                          "baseline_value": baseline_value}), flush=True)

    for name in shapes:
        shape = LLAMA_TINY if name == "tiny" else SHAPES[name]
        vocab = shape["vocab_size"]
        tokenizer = word_tokenizer(vocab)
        cfg = ServingConfig(scheduler=SchedulerConfig(max_batch_size=concurrent, max_queue=4096), max_new_tokens=new)
        one = random_prompts(1, prompt, vocab)
        many = random_prompts(concurrent, prompt, vocab, seed=2)
        probes = random_prompts(GREEDY_PROMPTS, prompt, vocab, seed=3)
        base: dict[str, float] = {}
        reference: list[list[int]] = []
        for world in [0, *worlds]:  # 0: the plain one-GPU engine, the baseline of the rest
            if dev == "cuda" and world > gpus:
                print(f"{name}: world {world} skipped, {gpus} GPU(s) visible", flush=True)
                continue
            label = "plain" if world == 0 else f"tp{world}"
            model = random_llama(shape, dev, dtype)  # the split engine frees the model's layers: a fresh one each
            started = time.perf_counter()
            engine = Engine(model, tokenizer, cfg) if world == 0 else split_engine(model, tokenizer, cfg, world)
            start_s = time.perf_counter() - started
            try:
                rates = {"1stream": engine_tokens_per_s(engine, one, new),
                         f"{concurrent}streams": engine_tokens_per_s(engine, many, new)}
                tokens = greedy_tokens(engine, probes, GREEDY_NEW)
            finally:
                engine.close()
            del engine, model
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
            put(f"{name}_{label}_start_s", start_s, "s (KV cache, workers, weights, graph capture)")
            for key, rate in rates.items():
                if world == 0:
                    base[key] = rate
                    put(f"{name}_{label}_{key}_tok_s", rate, "output tok/s")
                else:
                    put(f"{name}_{label}_{key}_tok_s", rate, "output tok/s", "plain engine, one GPU", base[key])
            if world == 0:
                reference = tokens
            else:
                put(f"{name}_{label}_greedy_agreement", agreement(tokens, reference),
                    "share of greedy tokens before the first difference", "plain engine, one GPU", 1.0)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    run(main)
