"""Bits per byte: every token of the held-out text is predicted once, and the bytes counted are exactly
the bytes of the text whose tokens were scored."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import build_model_dir

from lmforge.evaluation.heldout import score_heldout, select_heldout, stream_windows
from lmforge.evaluation.metrics import bits_per_byte
from lmforge.evaluation.scoring import load_model

# Multi-byte UTF-8 on purpose: bytes, not characters, are the denominator.
TEXTS = ["Return the absolute value of a number.", "Serialize obj to a JSON formatted str — naïve café ✓.",
         "Open file and return a corresponding file object."]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(build_model_dir(tmp_path_factory.mktemp("model") / "tiny"))


def test_bits_per_byte_arithmetic():
    assert bits_per_byte(math.log(2) * 80, 10) == pytest.approx(8.0)
    assert math.isnan(bits_per_byte(1.0, 0))


@pytest.mark.parametrize("window", [2, 5, 16, 512])
def test_windows_predict_every_token_once(loaded, window):
    _, tokenizer = loaded
    stream = [tokenizer.eos_token_id]
    for text in TEXTS:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = stream_windows(TEXTS, tokenizer, window)
    predicted = [token for w in windows for token in w[1:]]
    assert predicted == stream[1:]
    assert all(len(w) <= window for w in windows)


def test_score_counts_the_bytes_of_exactly_the_scored_text(loaded):
    model, tokenizer = loaded
    with torch.inference_mode():
        score = score_heldout(model, tokenizer, TEXTS, window=512, batch_size=2)
        # One window holds the whole stream: the NLL is one forward pass's, computed independently.
        ids = torch.tensor([stream_windows(TEXTS, tokenizer, 512)[0]])
        logits = model(input_ids=ids).logits
        expected = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
    assert score.bytes == sum(len(t.encode("utf-8")) for t in TEXTS) > sum(len(t) for t in TEXTS)
    assert score.tokens == ids.shape[1] - 1
    assert score.nll_nats == pytest.approx(expected, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(expected / math.log(2) / score.bytes, rel=1e-5)
    assert score.loss == pytest.approx(expected / score.tokens, rel=1e-5)


def test_padding_and_batching_do_not_change_the_score(loaded):
    model, tokenizer = loaded
    with torch.inference_mode():
        one = score_heldout(model, tokenizer, TEXTS, window=7, batch_size=1)
        many = score_heldout(model, tokenizer, TEXTS, window=7, batch_size=8)
    assert (one.tokens, one.bytes) == (many.tokens, many.bytes)
    assert one.nll_nats == pytest.approx(many.nll_nats, rel=1e-5)


def test_select_heldout_keeps_the_budget_and_cuts_at_a_token(loaded):
    _, tokenizer = loaded
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS]
    budget = lengths[0] + lengths[1] // 2
    chosen = select_heldout(TEXTS, tokenizer, budget)
    assert chosen[0] == TEXTS[0] and len(chosen) == 2
    assert TEXTS[1].startswith(chosen[1]) and chosen[1] != TEXTS[1]
    used = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in chosen)
    assert used <= budget
    assert select_heldout(TEXTS, tokenizer, 10_000) == TEXTS
