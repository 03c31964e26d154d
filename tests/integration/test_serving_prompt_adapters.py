"""Prompt-learning adapters (prefix, P-tuning v2, prompt tuning, P-tuning) served from the KV cache.

Each method fine-tunes a short-pretrained tiny Llama, and a GPT-2, for a few steps with the real
training stage. The served greedy tokens must equal those of the peft model ``load_trained``
returns, and the served log-probabilities (of the echoed prompt and of the completion) its
forward's, on the paged backend (our Llama runner) and on the HF backend (GPT-2 is not a Llama:
HF only). The log-probabilities are what makes the check sharp: a tiny model's greedy text barely
depends on its adapter, its distributions do. One model goes through the HTTP server with the
``openai`` client; the context-window check counts the virtual tokens.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
from helpers import BASE_TRAINING, CASES, finetune, serve
from helpers import METHODS_MODEL as MODEL
from transformers import AutoModelForCausalLM

from lmforge.config.base import updated
from lmforge.config.serving import ServingConfig
from lmforge.serving.adapters.virtual_tokens import PagedPrefix, VirtualPrefix
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine, RequestError, SamplingParams
from lmforge.serving.model.kv_cache import CacheShape, PagedKVCache
from lmforge.stages.train import train
from lmforge.tokenizer.build import load_tokenizer
from lmforge.train.artifacts import greedy_ids, load_trained

METHODS = ("prefix", "ptuning_v2", "prompt", "ptuning")
PROMPTS = ["def add(a, b):", "The quick brown", "x",
           "The quick brown fox jumps over the lazy dog, then returns json.dumps(a) + str(b) twice"]
NEW_TOKENS = 8
VIRTUAL = 16  # training.prompt_learning.num_virtual_tokens (default)
SCORED = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0, prompt_logprobs=0)
QUICK = updated(BASE_TRAINING, pretrain={"steps": 12}, finetune={"steps": 4, "warmup_steps": 0},
                logging={"every": 100}, validation={"batches": 1})


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    return tokenized_workspace("methods", MODEL)


@pytest.fixture(scope="module")
def trained(ws):
    """model/ directory of each (architecture, method), plus ("llama", "llama_adapter")."""
    dirs: dict[tuple[str, str], Path] = {}
    for architecture in ("llama", "gpt2"):
        # Room for the virtual tokens before a 64-token training sequence (GPT-2's positions are a table).
        cfg = MODEL.model_copy(update={"max_seq_len": 96})
        if architecture != "llama":
            cfg = cfg.model_copy(update={"architecture": architecture, "num_kv_heads": MODEL.num_heads})
        base = train(QUICK, cfg, ws, run_name=f"serve-base-{architecture}").model_dir
        cfg = cfg.model_copy(update={"base_model": str(base)})
        for method in METHODS:
            dirs[architecture, method] = _finetune(ws, cfg, method, QUICK.finetune.steps)
        if architecture == "llama":  # LLaMA-Adapter's gates start at zero: more steps make its effect measurable
            dirs[architecture, "llama_adapter"] = _finetune(ws, cfg, "llama_adapter", 12)
    return dirs


def _finetune(ws, cfg, case: str, steps: int) -> Path:
    # A phase passed to finetune() keeps its learning rate: give it the method's tuned one.
    phase = QUICK.finetune.model_copy(update={"steps": steps, "learning_rate": CASES[case]["lr"]})
    return finetune(ws, cfg, case, finetune=phase, logging={"every": 100}, validation={"batches": 1}).model_dir


@torch.no_grad()
def _scores(model, ids: list[int]) -> list[float]:
    """Log-probability of every token after the first: the prompt's (echo) and the completion's."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # prompt tuning: virtual rows first
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()


def _reference(model_dir: Path) -> list[tuple[list[int], list[float], list[float]]]:
    """Per prompt: greedy tokens of the peft model ``load_trained`` returns, its log-probabilities of
    the prompt and those tokens, and the base model's (without the adapter) of the same tokens."""
    model, tokenizer = load_trained(model_dir), load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # transformers alone: the base
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        tokens = greedy_ids(model, tokenizer, prompt, NEW_TOKENS)
        out.append((tokens, _scores(model, ids + tokens), _scores(base, ids + tokens)))
    return out


def _served(engine: Engine) -> list[tuple[list[int], list[float]]]:
    out = []
    for completion in engine.generate(PROMPTS, SCORED):
        scores = [e.logprob for e in completion.prompt_logprobs[1:]] + [e.logprob for e in completion.logprobs]
        out.append((list(completion.token_ids), scores))
    return out


def _check(served: list[tuple[list[int], list[float]]], reference) -> None:
    for (tokens, scores), (want_tokens, want_scores, _) in zip(served, reference, strict=True):
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(want_scores), rtol=0, atol=2e-4)
    # The adapter changes the model: without its virtual tokens the scores would be the base's.
    assert max(abs(a - b) for _, want, base in reference for a, b in zip(want, base)) > 1e-2


def _engine(model_dir: Path, **cfg) -> Engine:
    return Engine.load(model_dir, device="cpu", cfg=ServingConfig(**cfg))


@pytest.mark.parametrize("method", METHODS)
def test_llama_prompt_adapter_serves_the_peft_model(trained, method):
    model_dir = trained["llama", method]
    reference = _reference(model_dir)
    # Blocks of 8: the 16 virtual tokens fill 2 shared blocks; of 6: 2 shared, 4 copied per sequence,
    # and prompts prefilled 16 tokens at a time (the last prompt in chunks).
    for backend, block, shared, chunk in (("paged", 8, 2, 512), ("paged", 6, 2, 16), ("hf", 16, 0, 512)):
        # 4 prompts on 2 rows: later ones join a running batch.
        engine = _engine(model_dir, runtime={"engine": backend}, kv_cache={"block_size": block},
                         scheduler={"max_batch_size": 2, "max_prefill_tokens": chunk})
        try:
            assert engine.backend.name == backend and engine.backend.virtual_tokens == VIRTUAL
            assert len(getattr(engine.backend.prefix, "shared", [])) == shared
            _check(_served(engine), reference)
            assert engine.cache_usage == 0.0 and engine.stats["prefills"] >= 2
        finally:
            engine.close()


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_prompt_adapter_serves_the_peft_model(trained, method):
    model_dir = trained["gpt2", method]
    engine = _engine(model_dir, scheduler={"max_batch_size": 2})
    try:
        assert engine.backend.name == "hf"
        _check(_served(engine), _reference(model_dir))
    finally:
        engine.close()


def test_llama_adapter_is_served_by_the_hf_backend(trained):
    model_dir = trained["llama", "llama_adapter"]
    engine = _engine(model_dir, scheduler={"max_batch_size": 2})
    try:
        assert engine.backend.name == "hf"  # peft's adapted attention modules: the model's own forward
        _check(_served(engine), _reference(model_dir))
    finally:
        engine.close()


def test_prefix_blocks_are_shared_and_the_rest_copied_per_sequence():
    cache = PagedKVCache(CacheShape(2, 2, 4, 4, torch.float32), 10, 5, 32, torch.device("cpu"))
    keys, values = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)  # 6 virtual tokens: 1 block and 2 slots
    prefix = PagedPrefix(VirtualPrefix("PREFIX_TUNING", keys, values), cache)
    assert len(prefix.shared) == 1 and cache.usable_blocks == 8
    rows = [prefix.reserve(6) for _ in range(4)]  # 12 positions = 3 blocks, 2 of them the row's own
    assert not prefix.can_reserve(1)  # 4 rows x 2 own blocks: the pool is empty
    for row in rows:
        slots = cache.slots(row, 0, 6)
        torch.testing.assert_close(cache.keys[:, slots], keys)
        torch.testing.assert_close(cache.values[:, slots], values)
    assert cache.slots(rows[0], 0, 4) == cache.slots(rows[1], 0, 4)  # one shared block
    assert not set(cache.slots(rows[0], 4, 12)) & set(cache.slots(rows[1], 4, 12))  # the rest is each row's
    for row in rows:
        cache.release(row)
    assert cache.usage == 0.0 and prefix.fits_ever(32 - 6) and not prefix.fits_ever(32 - 5)


def test_virtual_tokens_count_against_the_context_window(trained):
    engine = _engine(trained["llama", "prefix"])
    try:
        prompt = engine.encode(PROMPTS[0])
        room = engine.context_window - VIRTUAL - len(prompt)
        with pytest.raises(RequestError) as err:
            engine.check(prompt, SamplingParams(max_tokens=room + 1))
        assert (f"the prompt has {len(prompt)} tokens, the model's adapter adds {VIRTUAL} virtual tokens"
                in err.value.cause and f"{engine.context_window + 1} exceeds" in err.value.cause)
        assert engine.token_budget(len(prompt), None, 10_000) == room
        # The longest request that fits runs to its end: the cache held the prefix, prompt and every token.
        [done] = engine.generate([prompt], SamplingParams(max_tokens=room, temperature=0, ignore_eos=True))
        assert done.completion_tokens == room
    finally:
        engine.close()


def test_openai_client_against_a_prompt_tuned_model(trained):
    model_dir = trained["llama", "ptuning"]
    [(tokens, scores, _)] = _reference(model_dir)[:1]
    tokenizer = load_tokenizer(model_dir)
    engine = _engine(model_dir)
    try:
        with serve(create_app(engine, "ptuned", ServingConfig(max_new_tokens=engine.context_window))) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            out = client.completions.create(model="ptuned", prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                             temperature=0, echo=True, logprobs=0)
            choice = out.choices[0]
            # No virtual token in the text, the echo or the logprobs: the prompt's tokens, then the completion's.
            assert choice.text == PROMPTS[0] + tokenizer.decode(tokens)
            assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
            assert choice.logprobs.token_logprobs[0] is None
            torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), torch.tensor(scores),
                                       rtol=0, atol=2e-4)
            window = engine.context_window
            too_many = window - VIRTUAL - out.usage.prompt_tokens + 1
            with pytest.raises(openai.BadRequestError,
                               match=f"adds {VIRTUAL} virtual tokens.*{window + 1} exceeds the model's context window"):
                client.completions.create(model="ptuned", prompt=PROMPTS[0], max_tokens=too_many)
    finally:
        engine.close()
