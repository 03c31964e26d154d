"""Shared parts of the serving benchmarks: a synthetic model and tokenizer, and the timed runs.

Needs only torch and transformers (plus lmforge: ``PYTHONPATH=src`` where it is not installed), so
it runs on a bare GPU machine.
The tokenizer is a word-level one with one word per id (``t0`` ... ``t31999``): any token id
decodes, so a random-weight model's output can be streamed as text like a real one's.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from pathlib import Path

import torch

from lmforge.serving.engine import Engine, SamplingParams

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
# --tiny runs: the same code paths on a CPU in seconds.
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", pad_token="t0", unk_token="t0")


def random_llama(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A Llama of ``shape`` with random weights, initialized directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None  # baselines must run every step, as the engine (ignore_eos) does
    return model.eval()


def save_tiny_model(path: Path) -> Path:
    """A random :data:`LLAMA_TINY` with its word-level tokenizer, saved as a model directory (--tiny runs)."""
    random_llama(LLAMA_TINY, "cpu", torch.float32).save_pretrained(path)
    word_tokenizer(LLAMA_TINY["vocab_size"]).save_pretrained(path)
    return path


def random_prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def engine_tokens_per_s(engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int = 3,
                        adapters: list[str | None] | None = None) -> float:
    """Output tokens per second for all ``prompts`` submitted at once (prefill included); median run.

    Each run's prompts differ from every earlier run's in their first token, so the prefix cache
    (on by default) never skips a prefill this measures: every run pays for all of its prompts."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    low, high = min(min(p) for p in prompts), max(max(p) for p in prompts)
    rates = []
    for run in range(repeats):
        fresh = [[low + (p[0] - low + run + 1) % (high - low + 1), *p[1:]] for p in prompts]
        _sync()
        start = time.perf_counter()
        results = engine.generate(fresh, params, adapters=adapters)
        _sync()
        produced = sum(r.completion_tokens for r in results)
        rates.append(produced / (time.perf_counter() - start))
    return statistics.median(rates)


def generate_tokens_per_s(model, prompts: list[list[int]], new_tokens: int, repeats: int = 1, **kwargs) -> float:
    """transformers ``generate()`` (greedy, every prompt in one batch): output tokens per second.
    One untimed warm-up call of the same shape first (it holds any compilation)."""
    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    args = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=0, **kwargs)
    with torch.inference_mode():
        model.generate(ids, **args)
        rates = []
        for _ in range(repeats):
            _sync()
            start = time.perf_counter()
            out = model.generate(ids, **args)
            _sync()
            rates.append((out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start))
    return statistics.median(rates)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _one(engine: Engine, prompt: list[int], params: SamplingParams, out: dict) -> None:
    start = time.perf_counter()
    stamps = []
    async for delta in engine.stream(prompt, params):
        if delta.text or delta.completion is not None:
            stamps.append(time.perf_counter())
    out.setdefault("ttft", []).append(stamps[0] - start)
    out.setdefault("itl", []).extend(b - a for a, b in itertools.pairwise(stamps))
    out["tokens"] = out.get("tokens", 0) + params.max_tokens


def stream_timing(engine: Engine, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One request alone, streamed: its time to first token and its inter-token gaps (seconds), which
    split a one-stream tokens/s figure into the prefill's share and the decode steps'."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    out: dict = {}
    asyncio.run(_one(engine, prompt, params, out))
    return {"ttft": out["ttft"][0], "itl_p50": percentile(out["itl"], 50), "itl_mean": statistics.fmean(out["itl"])}


def median_stream_timing(engine: Engine, prompt_len: int, new_tokens: int, runs: int = 3,
                         seed: int = 99) -> dict[str, float]:
    """:func:`stream_timing` of ``runs`` fresh random prompts (none in the prefix cache), one after another:
    the median of each figure (a single request's time to first token varies by milliseconds)."""
    prompts = random_prompts(runs, prompt_len, engine.vocab_size, seed)
    timings = [stream_timing(engine, prompt, new_tokens) for prompt in prompts]
    return {key: statistics.median(t[key] for t in timings) for key in timings[0]}


def poisson_engine(engine: Engine, rate: float, requests: int, prompt_len: int, new_tokens: int,
                   seed: int = 3) -> dict[str, float]:
    """Requests arriving as a Poisson process of ``rate`` per second, straight into the engine (no
    HTTP): time-to-first-token and inter-token latency percentiles, and the achieved output rate."""
    prompts = random_prompts(requests, prompt_len, engine.vocab_size, seed)
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.empty(requests).exponential_(rate, generator=gen).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    out: dict = {}

    async def run() -> float:
        tasks = []
        start = time.perf_counter()
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(_one(engine, prompt, params, out)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - start

    wall = asyncio.run(run())
    return {"rate": rate, "ttft_p50": percentile(out["ttft"], 50), "ttft_p99": percentile(out["ttft"], 99),
            "itl_p50": percentile(out["itl"], 50), "itl_p99": percentile(out["itl"], 99),
            "output_tok_s": out["tokens"] / wall}
