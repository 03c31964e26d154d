"""Speculative decoding's back-off and its verify graphs' layout, on CPU with a tiny random Llama.

Back-off is driven by a scripted proposer (a real :class:`Proposer`: it guesses from the plain
engine's own greedy output, wrong on purpose until a chosen token, right after it), so when guesses
fail and when they succeed is known, and the engine's output must still equal plain decoding's.
The verify graphs' capture needs CUDA; their static layout (padding runs and batch slots to the
cache's scratch row) runs here eagerly through the same runner and must give the eager verify's logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir

from lmforge.config.serving import ServingConfig
from lmforge.serving.backends.base import PrefillItem
from lmforge.serving.backends.paged import PagedBackend
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.proposers import Proposal
from lmforge.serving.engine.requests import CompletionCollector
from lmforge.serving.engine.sequence import Sequence
from lmforge.serving.model.ops import Ops, TritonOps
from lmforge.serving.model.verify_graphs import VerifyBatch, verify_inputs

PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-backoff"))


def _engine(model_dir: Path, overlap: bool = True, **speculative) -> Engine:
    cfg = ServingConfig(kv_cache={"block_size": 4}, speculative=speculative, runtime={"overlap_decode": overlap})
    return Engine.load(model_dir, device="cpu", cfg=cfg)


@pytest.fixture(scope="module")
def plain(model_dir: Path) -> dict[tuple[int, ...], list[int]]:
    engine = _engine(model_dir)
    try:
        return {tuple(p): list(c.token_ids) for p, c in zip(PROMPTS, engine.generate(PROMPTS, PARAMS))}
    finally:
        engine.close()


class ScriptedProposer:
    """Guesses each sequence's next tokens from its plain greedy output: every guess off by one until
    the sequence has ``right_from`` tokens, the true tokens from then on; ``None``: never guesses."""

    def __init__(self, plain: dict[tuple[int, ...], list[int]], vocab: int, right_from: int | None,
                 now_and_then: tuple[tuple[int, ...], ...] = ()) -> None:
        self.plain, self.vocab, self.right_from, self.now_and_then = plain, vocab, right_from, now_and_then
        self.calls: list[int] = []  # per call, how many sequences were asked for guesses (limit > 0)

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        self.calls.append(sum(k > 0 for k in limits))
        out = []
        for seq, k in zip(seqs, limits):
            n = len(seq.token_ids)
            true = self.plain[tuple(seq.prompt)][n : n + k]
            if self.right_from is None:
                out.append(Proposal([]))
            elif tuple(seq.prompt) in self.now_and_then:  # after an odd count 2 right guesses (3 tokens), none after
                out.append(Proposal(true[:2] if n % 2 else []))  # an even one (a plain round: 1 token): alternating
            elif n >= self.right_from:
                out.append(Proposal(true))
            else:
                out.append(Proposal([(t + 1) % self.vocab for t in true]))
        return out

    def accepted(self, seqs: list[Sequence], counts: list[int]) -> None:
        pass

    def retain(self, seqs: list[Sequence]) -> None:
        pass


def count_forwards(engine: Engine) -> dict[str, int]:
    """Count the backend's decode and verify forwards (the real methods run; the speculator shares the backend)."""
    counts = {"decode": 0, "verify": 0}
    backend = engine.backend
    for name in counts:
        real = getattr(backend, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        setattr(backend, name, counted)
    return counts


def _run(model_dir: Path, plain: dict, right_from: int | None, overlap: bool = True,
         now_and_then: tuple[tuple[int, ...], ...] = (), **speculative) -> tuple[list[tuple], dict, list[int]]:
    engine = _engine(model_dir, overlap, method="ngram", num_tokens=3, **speculative)
    assert engine.speculator is not None
    proposer = ScriptedProposer(plain, engine.vocab_size, right_from, now_and_then)
    engine.speculator.proposer = proposer  # before any request: the engine thread is idle
    forwards = count_forwards(engine)
    try:
        out = [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]
    finally:
        engine.close()
    return out, {**engine.speculator.stats, **engine.stats, "forwards": sum(forwards.values())}, proposer.calls


def test_backoff_engages_on_failing_guesses_and_disengages_when_they_succeed(model_dir: Path, plain: dict) -> None:
    out, stats, calls = _run(model_dir, plain, right_from=12, backoff_acceptance=0.5, backoff_steps=2)
    assert out == [tuple(plain[tuple(p)]) for p in PROMPTS]  # greedy: exactly plain decoding's tokens
    # Wrong guesses for the first 12 tokens: each sequence backs off after its first verify, probes after
    # 2 plain steps, fails again and pauses 4 (doubled), ...
    assert stats["backoffs"] >= 2 * len(PROMPTS)
    assert stats["paused_steps"] >= 2 * 2 + 2 * 4
    assert 0 in calls  # rounds in which every sequence was paused: no guesses asked for, no verify paid
    # ... and once guesses are right, a probe succeeds and speculation goes on: most of the 40 tokens come
    # from accepted guesses (3 per verify when all are right).
    assert stats["accepted"] >= len(PROMPTS) * 15
    assert stats["verify_steps"] < 39


def test_zero_threshold_never_backs_off(model_dir: Path, plain: dict) -> None:
    out, stats, calls = _run(model_dir, plain, right_from=10**6, backoff_acceptance=0.0)
    assert out == [tuple(plain[tuple(p)]) for p in PROMPTS]
    assert stats["backoffs"] == 0 and stats["paused_steps"] == 0 and stats["accepted"] == 0
    # 39 decode rounds (the prefill gives the first token): every one verified but the last, which may guess nothing.
    assert stats["verify_steps"] == 38 and stats["plain_rounds"] == 1 and 0 not in calls[:-1]


def test_sequences_without_guesses_pay_no_verify(model_dir: Path, plain: dict) -> None:
    out, stats, _ = _run(model_dir, plain, right_from=None)
    assert out == [tuple(plain[tuple(p)]) for p in PROMPTS]
    assert stats["verify_steps"] == 0 and stats["plain_rounds"] == 39  # the prefill gives the first of 40 tokens


def test_paused_rounds_are_launched_ahead_and_change_nothing(model_dir: Path, plain: dict) -> None:
    # Guesses never right: every verify fails, so the sequences spend most rounds paused. Those rounds are
    # plain steps launched ahead from the device's tokens (overlap); with overlap off, none is. Whether a
    # round is speculated depends only on what came before it, so the speculator's counts and the tokens
    # are the same either way.
    runs = {overlap: _run(model_dir, plain, right_from=10**6, overlap=overlap, backoff_acceptance=0.5,
                          backoff_steps=3) for overlap in (True, False)}
    for out, _, _ in runs.values():
        assert out == [tuple(plain[tuple(p)]) for p in PROMPTS]
    (_, ahead, ahead_calls), (_, eager, eager_calls) = runs[True], runs[False]
    assert ahead["launched_ahead"] > 0 and eager["launched_ahead"] == 0
    counts = ("proposed", "accepted", "verify_steps", "backoffs", "paused_steps")
    assert {k: ahead[k] for k in counts} == {k: eager[k] for k in counts}
    assert ahead["paused_steps"] >= 2 * (3 + 6)  # both sequences paused at least twice (the pause doubles)
    # Rounds launched ahead ask for no guesses: fewer proposer calls, the same ones with guesses.
    assert len(ahead_calls) < len(eager_calls)
    assert [c for c in ahead_calls if c] == [c for c in eager_calls if c]


def test_a_paused_sequence_rides_in_the_verify_of_one_that_guesses(model_dir: Path, plain: dict) -> None:
    # The first prompt guesses right every other round and nothing in between; the second always wrong, so it
    # pauses. After a round without guesses, the first may guess again: the paused
    # second is then not launched ahead (a decode forward beside the first's verify) but rides along in that
    # verify. Overlap never adds a forward: the counts are those of the run without it.
    runs = {overlap: _run(model_dir, plain, right_from=10**6, overlap=overlap, now_and_then=(tuple(PROMPTS[0]),),
                          backoff_acceptance=0.5, backoff_steps=3) for overlap in (True, False)}
    for out, _, _ in runs.values():
        assert out == [tuple(plain[tuple(p)]) for p in PROMPTS]
    ahead, eager = runs[True][1], runs[False][1]
    assert ahead["accepted"] > 0 and ahead["backoffs"] > 0 and ahead["plain_rounds"] > 0
    assert ahead["forwards"] == eager["forwards"] and ahead["verify_steps"] == eager["verify_steps"]
    assert ahead["launched_ahead"] > 0  # once the first is done, the second alone is launched ahead while paused


class JoiningProposer(ScriptedProposer):
    """The first prompt always guesses wrong (it backs off); once it has ``at`` tokens (counted at the start of
    a round, the same round with overlap on or off), the second prompt is submitted from the engine's own
    thread, so it joins at the next step; it guesses right every other round."""

    def __init__(self, engine: Engine, plain: dict, collector: CompletionCollector, at: int) -> None:
        super().__init__(plain, engine.vocab_size, right_from=10**6, now_and_then=(tuple(PROMPTS[1]),))
        self.engine, self.collector, self.at, self.joined = engine, collector, at, False

    def retain(self, seqs: list[Sequence]) -> None:
        first = [s for s in seqs if s.prompt == PROMPTS[0]]
        if not self.joined and first and len(first[0].token_ids) >= self.at:
            self.joined = True
            self.engine.submit(PROMPTS[1], PARAMS, self.collector.sink(1), bounded=False)


JOIN_AT = 9  # the first prompt's tokens when the second joins: inside one of its pauses (launched ahead)


def test_a_sequence_joining_a_paused_batch_stops_the_launches(model_dir: Path, plain: dict) -> None:
    # The batch is one paused sequence, its steps launched ahead; a sequence that may guess joins. From then on
    # the paused one rides along in the newcomer's verifies instead of being launched beside them: overlap
    # adds no forward, and the tokens are plain decoding's.
    counts = {}
    for overlap in (True, False):
        engine = _engine(model_dir, overlap, method="ngram", num_tokens=3, backoff_acceptance=0.5, backoff_steps=3)
        assert engine.speculator is not None
        collector = CompletionCollector(2)
        proposer = JoiningProposer(engine, plain, collector, at=JOIN_AT)
        engine.speculator.proposer = proposer  # before any request: the engine thread is idle
        forwards = count_forwards(engine)
        try:
            engine.submit(PROMPTS[0], PARAMS, collector.sink(0), bounded=False)
            out = [c.token_ids for c in collector.wait(timeout_s=120)]
        finally:
            engine.close()
        assert proposer.joined and out == [tuple(plain[tuple(p)]) for p in PROMPTS]
        counts[overlap] = {**engine.speculator.stats, **engine.stats, "forwards": sum(forwards.values())}
    ahead, eager = counts[True], counts[False]
    assert ahead["launched_ahead"] > 0 and ahead["accepted"] > 0 and ahead["verify_steps"] == eager["verify_steps"]
    # One forward more at most: the round the newcomer joins, the paused one's step was launched before it came.
    assert eager["forwards"] <= ahead["forwards"] <= eager["forwards"] + 1


# ---------------------------------------------------------------- the verify graphs' layout


def test_verify_inputs_pad_runs_and_batch_slots_to_the_scratch_row() -> None:
    ids, blocks = verify_inputs([3, 1], [10, 7], [[50, 51, 52], [60]], width=3, bucket=4, scratch_row=9)
    tokens, positions, rows = ids
    assert tokens == [50, 51, 52, 60, 0, 0] + [0] * 6
    assert positions == [10, 11, 12, 7, 0, 1] + [0, 1, 2] * 2
    assert rows == [3, 3, 3, 1, 9, 9] + [9] * 6
    assert blocks == [[3, 1, 9, 9], [3, 1, 1, 1]]  # query blocks: cache row, real tokens
    with pytest.raises(ValueError, match="does not fit 3 slots"):
        verify_inputs([0], [0], [[1, 2, 3, 4]], width=3, bucket=1, scratch_row=9)
    with pytest.raises(ValueError, match="do not fit a verify bucket"):
        verify_inputs([0, 1], [0, 0], [[1], [2]], width=3, bucket=1, scratch_row=9)


_OPS = [pytest.param(Ops, id="torch"),
        pytest.param(TritonOps, id="triton", marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton and TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("ops", _OPS)
def test_padded_verify_layout_gives_the_eager_logits_and_writes_only_scratch(model_dir: Path, ops: type[Ops]) -> None:
    engine = _engine(model_dir)
    engine.close()  # only its model is needed
    backend = PagedBackend(engine.model, ServingConfig(kv_cache={"block_size": 4}), engine.context_window, ops=ops())
    width = 4
    prompts = [[5, 6, 7, 8, 9], [20, 21], [30, 31, 32, 33, 34, 35, 36]]
    rows = [backend.reserve(len(p) + 8) for p in prompts]
    runs = [[11, 12, 13, 14], [22], [37, 38]]  # a full run, a ride-along token, a short one
    positions = [len(p) for p in prompts]
    with torch.inference_mode():
        backend.prefill([PrefillItem(r, 0, p) for r, p in zip(rows, prompts)])
        want = [t.clone() for t in backend.verify(rows, positions, runs)]  # eager: the chunked-prefill path
        keys = [k.clone() for k in backend.cache.keys]
        batch = VerifyBatch(8, width, backend.cache.scratch_row, backend.device)
        b = batch.bucket(len(runs))
        assert b == 4  # one whole padding sequence besides the three
        got = batch.split(backend.runner.forward(batch.fill(rows, positions, runs, b)), runs)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # Padding wrote only into the scratch block (block 0): every other slot but the runs' own is as it was.
    written = [s for r, p, run in zip(rows, positions, runs) for s in backend.cache.slots(r, p, p + len(run))]
    kept = torch.ones(backend.cache.keys.shape[1], dtype=torch.bool)
    kept[: backend.cache.block_size] = False
    kept[written] = False
    for before, after in zip(keys, backend.cache.keys):
        torch.testing.assert_close(after[kept], before[kept], rtol=0, atol=0)
