"""Speculative decoding (n-gram prompt lookup and a draft model) on CPU with a tiny random Llama.

Greedy speculative output must equal plain output token for token (stop strings, EOS, max_tokens and
requests that are not speculated in the same batch); sampled output must follow the model's own
distribution: the rejection sampling alone against known distributions, and the engine's first
three tokens against the exact distribution computed with the model (TV distance, fixed seeds,
margins a correct implementation meets with room). The HTTP side (``/metrics``, the openai client)
is in tests/integration/test_serving_speculative_http.py.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir
from pydantic import ValidationError

from lmforge.config.serving import ServingConfig, SpeculativeConfig
from lmforge.core.errors import ConfigError
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.proposers import DraftProposer, Proposal, ngram_lookup
from lmforge.serving.engine.sampling import ResponseFormat
from lmforge.serving.engine.speculative import accept_run

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# Repetitive prompts (the n-gram proposer finds matches) and a plain one.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7], list(range(20, 36)) * 2, [3, 4], [50, 51, 52] * 5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-spec"))


@pytest.fixture(scope="module")
def draft_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A draft with the same tokenizer: the model with its weights perturbed, so it agrees with the
    model often but not always (a smaller random model would hardly ever agree with this random one)."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-draft")
    draft = LlamaForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in draft.parameters():
            weight.add_(0.03 * torch.randn_like(weight))
    draft.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def _engine(model_dir: Path, **speculative) -> Engine:
    return Engine.load(model_dir, device="cpu", cfg=ServingConfig(kv_cache={"block_size": 4}, speculative=speculative,
                                                                  scheduler={"max_batch_size": 64, "max_queue": 4096}))


def _tokens(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[tuple]:
    try:
        return [c.token_ids for c in engine.generate(prompts, params)]
    finally:
        engine.close()


# ---------------------------------------------------------------- config


def test_config_checks() -> None:
    assert ServingConfig().speculative.method == "none"
    with pytest.raises(ValidationError, match="needs draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValidationError, match="method: draft"):
        SpeculativeConfig(method="ngram", draft_model="/somewhere")
    with pytest.raises(ValidationError, match="ngram_min"):
        SpeculativeConfig(method="ngram", ngram_min=3, ngram_max=2)
    with pytest.raises(ValidationError):
        SpeculativeConfig.model_validate({"method": "ngram", "num_token": 3})  # a typo is an error, not a default
    with pytest.raises(ValidationError):
        SpeculativeConfig(method="medusa")


def test_draft_with_another_tokenizer_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from tiny_assets import build_model_dir  # a Llama with a tokenizer trained on another corpus

    other = build_model_dir(tmp_path / "other")
    with pytest.raises(ConfigError, match="another tokenizer"):
        _engine(model_dir, method="draft", draft_model=str(other))


def test_speculation_needs_the_paged_engine(model_dir: Path) -> None:
    cfg = ServingConfig(runtime={"engine": "hf"}, speculative={"method": "ngram"})
    with pytest.raises(ConfigError, match="paged engine"):
        Engine.load(model_dir, device="cpu", cfg=cfg)


# ---------------------------------------------------------------- proposals


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match() -> None:
    assert ngram_lookup([1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2, 3], 3, 1, 3) == [5, 1, 2]  # latest of two matches
    assert ngram_lookup([7, 1, 2, 8, 8, 2], 2, 1, 3) == [8, 8]  # no 2- or 3-gram match: the 1-gram [2]
    assert ngram_lookup([1, 2, 3], 4, 1, 3) == []  # nothing repeats
    assert ngram_lookup([4, 5, 4], 4, 2, 3) == []  # only a 1-gram matches, below ngram_min
    assert ngram_lookup([4, 5, 4, 5, 4], 4, 1, 2) == [5, 4]  # [5, 4] at 1 is the latest match with a follower


# ---------------------------------------------------------------- rejection sampling alone


def _tv(counts: dict[int, int], probs: torch.Tensor) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts.get(i, 0) / total - float(p)) for i, p in enumerate(probs))


@pytest.mark.parametrize("draft_probs", [True, False], ids=["draft", "point-mass"])
def test_accept_run_keeps_the_target_distribution(draft_probs: bool) -> None:
    """The first token emitted follows p_0, and the second (after an accepted guess) p_1, whatever q is."""
    target = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5, 0.0]])
    rng, guesses_rng = random.Random(0), random.Random(1)
    weights = q.tolist()
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    accepted = 0
    for _ in range(5_000):
        if draft_probs:
            guesses = [guesses_rng.choices(range(5), weights=weights[i])[0] for i in range(2)]
            proposal = Proposal(guesses, q)
        else:
            proposal = Proposal([guesses_rng.choice([0, 1, 4]), 3])
        run, n = accept_run(target, proposal, rng)
        assert len(run) == n + 1 and run[:n] == proposal.tokens[:n]
        accepted += n
        first[run[0]] = first.get(run[0], 0) + 1
        if len(run) > 1:
            second[run[1]] = second.get(run[1], 0) + 1
    assert 0 < accepted < 10_000
    assert _tv(first, target[0]) < 0.04  # sampling error alone: ~0.01 with 5,000 draws
    assert _tv(second, target[1]) < 0.07  # fewer draws (only after an accepted first guess)


def test_accept_run_greedy_keeps_the_argmax() -> None:
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert accept_run(target, Proposal([1, 2]), random.Random(0)) == ([1, 2, 0], 2)
    assert accept_run(target, Proposal([1, 0]), random.Random(0)) == ([1, 2], 1)
    assert accept_run(target, Proposal([0, 2]), random.Random(0)) == ([1], 0)


# ---------------------------------------------------------------- the engine, greedy


@pytest.fixture(scope="module")
def plain_greedy(model_dir: Path) -> list[tuple]:
    return _tokens(_engine(model_dir), PROMPTS, GREEDY)


def test_greedy_ngram_equals_plain(model_dir: Path, plain_greedy: list[tuple]) -> None:
    engine = _engine(model_dir, method="ngram", num_tokens=3)
    out = _tokens(engine, PROMPTS, GREEDY)
    assert out == plain_greedy
    assert engine.speculator is not None and engine.speculator.stats["accepted"] > 0


def test_greedy_draft_equals_plain(model_dir: Path, draft_dir: Path, plain_greedy: list[tuple]) -> None:
    engine = _engine(model_dir, method="draft", draft_model=str(draft_dir), num_tokens=4)
    out = _tokens(engine, PROMPTS, GREEDY)
    assert out == plain_greedy
    assert engine.speculator is not None and isinstance(engine.speculator.proposer, DraftProposer)
    stats = engine.speculator.stats
    assert 0 < stats["accepted"] < stats["proposed"]  # a real test of both branches: some accepted, some not
    assert not engine.speculator.proposer.rows  # every draft row released


def test_stop_rules_and_unspeculated_requests_match_plain(model_dir: Path) -> None:
    """max_tokens inside a run, EOS, a stop string, and requests with logprobs (decoded plainly) batched
    with speculated ones give what plain decoding gives."""
    plain = _engine(model_dir)
    text = plain.generate([PROMPTS[1]], GREEDY)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = [SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), SamplingParams(max_tokens=40, temperature=0),
              SamplingParams(max_tokens=24, temperature=0, stop=(stop,)),
              SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True)]
    want = [(c.token_ids, c.text, c.finish_reason) for c in plain.generate(PROMPTS, params)]
    plain.close()
    engine = _engine(model_dir, method="ngram", num_tokens=4, ngram_min=1)
    try:
        got = engine.generate(PROMPTS, params)
    finally:
        engine.close()
    assert [(c.token_ids, c.text, c.finish_reason) for c in got] == want
    assert got[3].logprobs is not None and len(got[3].logprobs) == 10


# ---------------------------------------------------------------- the engine, sampled


def _exact_joint(model_dir: Path, prompt: list[int], params: SamplingParams, length: int) -> dict[tuple, float]:
    """The exact distribution of the first ``length`` tokens under ``params`` (top-k keeps it small)."""
    from transformers import LlamaForCausalLM

    from lmforge.serving.engine.sampling import filtered_probs

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    joint: dict[tuple, float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            grown: dict[tuple, float] = {}
            for prefix, mass in joint.items():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[:, -1]
                probs = filtered_probs(logits, [params])[0]
                for token in torch.nonzero(probs).flatten().tolist():
                    grown[(*prefix, token)] = mass * float(probs[token])
            joint = grown
    return joint


@pytest.mark.parametrize("method", ["ngram", "draft", "none"])
def test_sampled_output_follows_the_model(model_dir: Path, draft_dir: Path, method: str) -> None:
    prompt = [100, 101] * 5 + [6, 6]  # the model's greedy output goes on with 6s: n-gram guesses it can accept
    length, draws = 3, 300
    params = [SamplingParams(max_tokens=length, temperature=1.0, top_k=2, ignore_eos=True, seed=s) for s in range(draws)]
    exact = _exact_joint(model_dir, prompt, params[0], length)
    options = {"ngram": {"method": "ngram", "num_tokens": 2},
               "draft": {"method": "draft", "draft_model": str(draft_dir), "num_tokens": 2}, "none": {}}[method]
    engine = _engine(model_dir, **options)
    out = _tokens(engine, [prompt] * draws, params)
    if method != "none":
        assert engine.speculator is not None and engine.speculator.stats["accepted"] > 30
    counts = {key: sum(1 for _ in group) for key, group in itertools.groupby(sorted(out))}
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(key, 0) / draws - p) for key, p in exact.items())
    # 8 outcomes, 300 draws: sampling error alone gives TV ~0.05 (hardly ever 0.1); a wrong acceptance rule
    # (e.g. accepting every guess) is far off.
    assert tv < 0.15, f"TV distance {tv:.3f} from the model's distribution"


def test_structured_requests_decode_plainly_beside_speculated_ones(model_dir: Path) -> None:
    """A response_format request (its grammar's mask is per step) is not speculated: it gets plain
    decoding's tokens, valid JSON, while the request beside it is speculated."""
    fmt = ResponseFormat("json_schema", json.dumps({"enum": ["yes", "no"]}))
    params = [SamplingParams(max_tokens=16, temperature=0, response_format=fmt), GREEDY]
    prompts = [PROMPTS[0], PROMPTS[1]]
    want = _tokens(_engine(model_dir), prompts, params)
    engine = _engine(model_dir, method="ngram", num_tokens=3)
    try:
        got = engine.generate(prompts, params)
    finally:
        engine.close()
    assert [c.token_ids for c in got] == want
    assert json.loads(got[0].text) in ("yes", "no")
    assert engine.speculator is not None and engine.speculator.stats["proposed"] > 0
