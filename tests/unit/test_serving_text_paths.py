"""A request's text is the same whether it is streamed or only its completion is read.

The engine decodes a streamed request token by token (``TextTracker.add``: deltas that never show
half a character or a stop string), and a request whose sink reads only its final delta
(``FinalOnly``: ``Engine.generate``, the HTTP API without ``stream``) once, when it finishes, unless a
stop string needs the text as it grows (``TextTracker.defer``). Both must give one completion: same
text, tokens, finish reason and logprobs, and the streamed deltas joined are that text. Checked on the
byte-level BPE the tiny served model uses (random tokens split multi-byte characters and make invalid
UTF-8), a Metaspace (sentencepiece-style) and a word-level tokenizer, and on the engine itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from pathlib import Path

import pytest
from helpers import SENTENCES, make_tiny_model_dir

from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.requests import Delta, FinalOnly, GenerationStream, Request, send
from lmforge.serving.engine.sampling import TextTracker


def _byte_level(tmp_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_model_dir(tmp_path))


def _metaspace(_: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")


def _word_level(_: Path):
    from bench.common.serve import word_tokenizer

    return word_tokenizer(500)


def _incremental(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], str]:
    tracker = TextTracker(tokenizer, stop)
    deltas = []
    for token in ids:
        deltas.append(tracker.add(token))
        if tracker.stopped:
            break
    deltas.append(tracker.flush())
    return deltas, tracker.text


def _deferred(tokenizer, ids: list[int]) -> str:
    tracker = TextTracker(tokenizer)
    for token in ids:
        tracker.defer(token)
    flushed = tracker.flush()
    assert flushed == tracker.text
    return flushed


@pytest.mark.parametrize("make", [_byte_level, _metaspace, _word_level])
def test_text_decoded_at_the_end_equals_the_streamed_text(make, tmp_path: Path) -> None:
    tokenizer = make(tmp_path)
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    cases = [tokenizer.encode(s, add_special_tokens=False) for s in SENTENCES]
    # Random tokens: byte-level ones split characters and pair bytes into invalid UTF-8.
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 48))] for _ in range(300)]
    broken = 0
    for ids in cases:
        deltas, text = _incremental(tokenizer, ids)
        assert "".join(deltas) == text == _deferred(tokenizer, ids)
        assert text == tokenizer.decode([t for t in ids if t not in special], skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
        # Within the stream no delta ends in half a character; the last may (a cut-off character).
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])
        broken += "\ufffd" in text
    assert broken > 10 or make is not _byte_level  # invalid UTF-8 was among the cases


def test_stop_strings_are_cut_and_never_streamed(tmp_path: Path) -> None:
    tokenizer = _byte_level(tmp_path)
    ids = tokenizer.encode(" ".join(SENTENCES), add_special_tokens=False)
    full = _deferred(tokenizer, ids)
    for stop in ["fox", "café", "é", "\n\n###", ".", "never there"]:
        deltas, text = _incremental(tokenizer, ids, (stop, "zzz-never"))
        assert "".join(deltas) == text == (full[: full.find(stop)] if stop in full else full)
        assert not any(stop in d for d in deltas)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    eng = Engine.load(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")), device="cpu", max_batch_size=16)
    yield eng
    eng.close()


def _streamed(engine: Engine, prompts: list[str], params: list[SamplingParams]):
    async def one(prompt: str, p: SamplingParams):
        parts, last = [], None
        async for delta in engine.stream(prompt, p):
            parts.append(delta.text)
            last = delta
        return "".join(parts), last.completion

    async def every():
        return await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params)))

    return asyncio.run(every())


def _printable_pair(text: str) -> str | None:
    """A two-character piece of ``text`` (after its start) without control or replacement characters."""
    return next((text[i : i + 2] for i in range(3, len(text) - 1) if text[i : i + 2].isprintable()
                 and "\ufffd" not in text[i : i + 2]), None)


def test_generate_equals_the_stream_with_eos_stops_logprobs_and_broken_bytes(engine: Engine) -> None:
    # Temperature 2 on a random model: byte tokens that split or break characters, and some EOS.
    prompts = ["The quick" if seed % 2 == 0 else "héllo wörld" for seed in range(24)]
    params = [SamplingParams(max_tokens=24, temperature=2.0, seed=seed, logprobs=2 if seed % 3 == 0 else None)
              for seed in range(24)]
    unstopped = engine.generate(prompts, params)
    for i in range(1, 24, 4):  # stop strings cut from the request's own text, so that they occur
        pair = _printable_pair(unstopped[i].text)
        if pair is not None:
            params[i] = dataclasses.replace(params[i], stop=(pair, "never-there"))
    finals = engine.generate(prompts, params)  # FinalOnly: decoded at the end unless a stop string is set
    streamed = _streamed(engine, prompts, params)
    for final, (joined, completion) in zip(finals, streamed, strict=True):
        assert (final.text, final.token_ids, final.finish_reason) == (completion.text, completion.token_ids,
                                                                      completion.finish_reason)
        assert joined == final.text
        # Logprobs: the same entries; the values to float noise (the two runs batch the rows differently).
        assert (final.logprobs is None) == (completion.logprobs is None)
        for ours, theirs in zip(final.logprobs or (), completion.logprobs or (), strict=True):
            assert (ours.token_id, ours.token) == (theirs.token_id, theirs.token)
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
    eos = [c for c in finals if c.finish_reason == "stop" and c.token_ids[-1] in engine.eos_ids]
    cut = [c for c, p in zip(finals, params) if p.stop and c.finish_reason == "stop"]
    assert eos and len(cut) >= 3 and any(c.finish_reason == "length" for c in finals)
    assert any(c.logprobs for c in finals) and any("\ufffd" in c.text for c in finals)
    assert any(ord(ch) > 127 and ch != "\ufffd" for c in finals for ch in c.text)


def test_a_final_only_sink_gets_one_delta_and_a_plain_one_a_delta_per_token(engine: Engine) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got: dict[str, list] = {"final": [], "plain": []}
    finished = threading.Semaphore(0)

    def sink(name: str):
        def deliver(item) -> None:
            got[name].append(item)
            if isinstance(item, BaseException) or item.completion is not None:
                finished.release()
        return deliver

    assert not engine.submit([5, 6, 7], params, FinalOnly(sink("final")), bounded=False).streamed
    assert engine.submit([5, 6, 7], params, sink("plain"), bounded=False).streamed
    assert finished.acquire(timeout=30) and finished.acquire(timeout=30)
    [final] = got["final"]
    assert final.completion == got["plain"][-1].completion and final.text == final.completion.text
    assert len(got["plain"]) > 1 and "".join(d.text for d in got["plain"]) == final.text


def test_a_stream_whose_event_loop_closed_is_cancelled() -> None:
    made: list[Request] = []

    def submit(ids: list[int], params: SamplingParams, sink) -> Request:
        made.append(Request(ids, params, sink))
        return made[-1]

    async def open_stream() -> GenerationStream:
        return GenerationStream(submit, [1], SamplingParams())

    loop = asyncio.new_event_loop()
    loop.run_until_complete(open_stream())
    loop.close()
    send(made[0], Delta("x"))  # the engine thread's hand-over fails: the request stops decoding
    assert made[0].cancelled.is_set()
