"""Speculative decoding benchmark: n-gram prompt lookup against plain decoding, one stream, the same job.

    PYTHONPATH=src:. python -m bench.serve.speculative                # Llama-1.1B shape, trained here, one GPU
    PYTHONPATH=src:. python -m bench.serve.speculative --tiny         # a 2-layer model on the CPU (a check)

The workload is code editing's: the output re-types spans of the prompt. Random weights copy
nothing, so a model is first trained in this job for ``--train-s`` seconds on a copy-and-edit task
(``bench/serve/copy_task.py``: ``A SEP A'``, ``A'`` being ``A`` with a few tokens replaced); its
teacher-forced copy accuracy is recorded, and printed plainly when it did not learn to copy. The
22 layers of the 1.1B shape trained from scratch did not learn to copy in 90 s on an H100 (accuracy
0.000, loss at chance), so ``--train-layers`` (default 2) layers of the shape are trained and the
model is then grown to the shape's depth (``--layers``) by pass-through layers (``copy_task.deepen``:
their output projections are zero), which leaves what it computes unchanged (checked:
``served_copy_accuracy``) and makes every forward cost the 1.1B's. Then two workloads, each
request one at a time (``max_batch_size`` 1), greedy, ``ignore_eos``, prefix caching off (a
full-length request of each workload warms up first):

- ``copy``: prompt ``A SEP A[:lead]``, ``new`` tokens (the rest of ``A`` is longer): the output
  should re-type ``A`` (``copy_copied_fraction``: output tokens equal to ``A``'s at the same position);
- ``nocopy``: a prompt of random tokens from the whole vocabulary with no copy cue: n-gram guesses
  mostly fail, which is what back-off (``serving.speculative.backoff_acceptance``) is for; its
  speedup should stay near 1.

For each k: output tok/s against plain decoding in the same job (same engine config otherwise,
CUDA graphs for plain decode and, on a GPU, for the verify step), the acceptance rate (accepted /
proposed guesses), tokens emitted per verify forward, back-offs, and whether the greedy outputs
equal plain decoding's (``greedy_identical``: on a GPU the verify forward's matmuls have other
shapes than the decode step's, so bf16 rounding may flip a near-tie). Rows go to
``OUT/serve_speculative.jsonl``. Needs only torch, transformers, triton and pydantic.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass, replace

import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import LLAMA_1B, LLAMA_TINY, random_llama, random_prompts, word_tokenizer
from bench.serve.copy_task import CopyTask, copy_accuracy, deepen, train_copier
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ConfigError
from lmforge.serving.engine import Engine, SamplingParams

BENCH = "serve_speculative"
COPIES = 0.9  # teacher-forced copy accuracy above which the model is said to copy


@dataclass(frozen=True)
class Scale:
    shape: dict
    task: CopyTask
    lead: int  # tokens of A given after SEP
    new: int  # tokens asked for (fewer than span - lead: the output stays inside A)
    requests: int  # timed requests per workload, one at a time
    num_tokens: tuple[int, ...]  # k values measured
    batch: int  # training sequences per step
    lr: float
    train_s: float
    train_layers: int | None = None  # layers trained (then deepened by pass-through layers); None: all of them
    train_steps: int | None = None  # a cap: the --tiny check trains the same model however busy the CPU is


FULL = Scale(LLAMA_1B, CopyTask(span=288, task_vocab=1024), lead=8, new=256, requests=3, num_tokens=(4, 8), batch=16,
             lr=1e-3, train_s=60.0, train_layers=2)
TINY = Scale(LLAMA_TINY, CopyTask(span=32, task_vocab=64), lead=4, new=24, requests=3, num_tokens=(4,), batch=16,
             lr=3e-3, train_s=40.0, train_steps=200)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, list[tuple[int, ...]], dict[str, int]]:
    """Output tokens/s over ``prompts`` run one after the other, their tokens, and what the engine's
    speculator counted meanwhile (empty without one), with the engine's decode steps launched ahead."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    # Warm-up: a whole request of the same shape first, so that every kernel the timed requests launch (the
    # prompt's prefill chunks, verify steps) is compiled; the engines cache no prefix, so each request re-prefills.
    engine.generate([prompts[0]], params)

    def counted() -> dict[str, int]:
        if engine.speculator is None:
            return {}
        return {**engine.speculator.stats, "launched_ahead": engine.stats["launched_ahead"]}

    before = counted()
    tokens, total = [], 0.0
    for prompt in prompts:
        _sync()
        begin = time.perf_counter()
        tokens.append(engine.generate([prompt], params)[0].token_ids)
        _sync()
        total += time.perf_counter() - begin
    after = counted()
    return sum(len(t) for t in tokens) / total, tokens, {key: after[key] - before[key] for key in after}


def trained_model(sc: Scale, layers: int | None, dev: str, put) -> torch.nn.Module:
    """The model of ``sc.shape`` (``layers`` deep when given) trained on the copy task, in the serving dtype:
    its first ``sc.train_layers`` layers trained, the rest pass-through layers (``copy_task.deepen``)."""
    depth = layers or sc.shape["num_hidden_layers"]
    trained = min(depth, sc.train_layers or depth)
    shape = dict(sc.shape, num_hidden_layers=trained)
    model = random_llama(shape, dev, torch.float32)  # float32 weights to train (bf16 autocast on CUDA)
    put("trained_layers", trained, f"layers trained on the copy task; {depth - trained} pass-through layers "
        "added after (attention output and MLP down projections zero: the full shape's cost, the trained function)")
    got = train_copier(model, sc.task, sc.train_s, sc.batch, sc.lr, dev, sc.train_steps)
    put("train_steps", got.steps, f"steps of {sc.batch} sequences of {2 * sc.task.span + 1} tokens in {got.seconds:.0f} s")
    put("train_loss", got.loss, "nats per token of the copy part, last step (edits make it > 0)")
    accuracy = copy_accuracy(model, sc.task, 16, dev)
    put("train_copy_accuracy", accuracy, "teacher-forced argmax equal to the copied token (no edits)")
    if accuracy < COPIES:
        print(f"THE MODEL DID NOT LEARN TO COPY: copy accuracy {accuracy:.3f} after {got.steps} steps; the speedup "
              "below is not a copy workload's. Train longer (--train-s) or fewer layers (--train-layers)", flush=True)
    if depth > trained:
        model = deepen(model, depth)
        put("served_copy_accuracy", copy_accuracy(model, sc.task, 16, dev),
            "the same after the pass-through layers were added (they must not change it)")
    put("model_params_m", sum(p.numel() for p in model.parameters()) / 1e6,
        f"million parameters served: hidden {shape['hidden_size']}, {depth} layers, "
        f"{shape['num_attention_heads']} heads, vocabulary {shape['vocab_size']}")
    model = model.to(torch.bfloat16 if dev == "cuda" else torch.float32)
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()  # the engines size their KV caches from the free memory
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "a 2-layer model on the CPU, trained 200 steps on a 32-token copy task: a check")
    parser.add_argument("--train-s", type=float, default=None, help="seconds of training (default: 60; with --tiny "
                        "200 steps, at most 40 s)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the served model (default: the shape's, "
                        "22 for the 1.1B)")
    parser.add_argument("--train-layers", type=int, default=None, help="layers trained on the copy task, the rest "
                        "pass-through (default: 2; 0: train every layer)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3; 3e-3 with --tiny)")
    args = parser.parse_args()
    out = out_dir(args)
    sc = TINY if args.tiny else FULL
    sc = replace(sc, train_s=args.train_s if args.train_s is not None else sc.train_s, lr=args.lr or sc.lr,
                 train_layers=sc.train_layers if args.train_layers is None else (args.train_layers or None))
    if args.layers is not None and args.layers < 1:
        raise ConfigError(f"--layers {args.layers} is not a layer count", "give 1 or more (default: the shape's)")
    if args.train_layers is not None and args.train_layers < 0:
        raise ConfigError(f"--train-layers {args.train_layers} is not a layer count",
                          "give 1 or more, or 0 to train every layer (default: 2)")
    if not args.tiny and not torch.cuda.is_available():
        raise ConfigError("the full benchmark needs a CUDA GPU", "run it on a GPU machine, or pass --tiny for the check")
    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model on a shared CPU: more threads only wait on each other
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (--tiny check)"
    figures: dict[str, float] = {}

    def put(metric: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None) -> None:
        figures[metric] = value
        record(BENCH, metric, value, unit, baseline, baseline_value, device=device, out_dir=out)

    model = trained_model(sc, args.layers, dev, put)
    tokenizer = word_tokenizer(sc.shape["vocab_size"])
    cases = sc.task.prompts(sc.requests, sc.lead, seed=7)
    workloads = {"copy": [prompt for prompt, _ in cases],
                 "nocopy": random_prompts(sc.requests, len(cases[0][0]), sc.shape["vocab_size"], seed=8)}
    one = {"scheduler": {"max_batch_size": 1, "max_queue": 64}, "max_new_tokens": sc.new,
           "kv_cache": {"prefix_caching": False}}
    plain = Engine(model, tokenizer, ServingConfig(**one))
    try:
        base = {name: timed(plain, prompts, sc.new) for name, prompts in workloads.items()}
    finally:
        plain.close()
    what = f"one stream, prompt {len(cases[0][0])} tokens, {sc.new} greedy tokens"
    for name, (tok_s, _, _) in base.items():
        put(f"{name}_plain_tok_s", tok_s, f"output tokens/s, {what}")
    copied = [sum(a == b for a, b in zip(t, rest)) / len(t) for t, (_, rest) in zip(base["copy"][1], cases)]
    put("copy_copied_fraction", statistics.fmean(copied), "fraction of plain output tokens equal to A's (same position)")
    for k in sc.num_tokens:
        spec = Engine(model, tokenizer, ServingConfig(**one, speculative={"method": "ngram", "num_tokens": k}))
        try:
            results = {name: timed(spec, prompts, sc.new) for name, prompts in workloads.items()}
        finally:
            spec.close()
        for name, (tok_s, tokens, stats) in results.items():
            base_tok_s, base_tokens, _ = base[name]
            tag = f"{name}_ngram_k{k}"
            put(f"{tag}_tok_s", tok_s, f"output tokens/s, {what}", "plain decoding, same job", base_tok_s)
            put(f"{tag}_speedup", tok_s / base_tok_s, "x plain decoding (same job)")
            put(f"{tag}_acceptance", stats["accepted"] / max(1, stats["proposed"]), "accepted / proposed guesses")
            put(f"{tag}_tokens_per_verify", (stats["accepted"] + stats["verify_steps"]) / max(1, stats["verify_steps"]),
                "tokens emitted per verify forward (accepted guesses + 1)")
            put(f"{tag}_verify_share", stats["verify_steps"] / max(1, stats["verify_steps"] + stats["plain_rounds"]),
                "decode rounds that ran a verify forward (the others: plain steps, no guess or backed off)")
            put(f"{tag}_backoffs", stats["backoffs"], "times the sequence stopped guessing after failed guesses")
            put(f"{tag}_launched_ahead", stats["launched_ahead"] / max(1, stats["verify_steps"] + stats["plain_rounds"]),
                "decode rounds launched ahead of the one before (paused rounds, overlapped as plain decoding)")
            put(f"{tag}_greedy_identical", sum(a == b for a, b in zip(tokens, base_tokens)) / len(tokens),
                "fraction of requests with the same tokens as plain decoding")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=1))
    print(f"records in {out}")
    return 0


if __name__ == "__main__":
    run(main)
