"""Metric arithmetic shared by evaluation, tracking and promotion, written once and unit-tested.

Pure functions over numbers and strings: perplexity from a mean token loss, bits per byte from a
total loss and a byte count, SQuAD-style exact
match, ROUGE-L F1 over word tokens, and the relative improvement the promotion policy compares.
The metric names the pipeline logs and promotes on are defined here too, so the evaluate stage,
MLflow and the promotion rule can never disagree about a spelling.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable
from typing import Literal

EVAL_LOSS = "eval_loss"
EVAL_PERPLEXITY = "eval_perplexity"
EVAL_EXACT_MATCH = "eval_exact_match"
EVAL_ROUGE_L = "eval_rouge_l"
EVAL_BITS_PER_BYTE = "eval_bits_per_byte"
# Per-token metrics: their values depend on the tokenizer, so two runs whose tokenizers differ are
# compared in bits per byte instead (see lmforge.stages.promote).
PER_TOKEN_METRICS = frozenset({EVAL_LOSS, EVAL_PERPLEXITY})

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"\w+")


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); +inf instead of an OverflowError for huge losses."""
    if math.isnan(mean_loss):
        return math.nan
    # exp overflows a double just above 709; such a model is simply infinitely perplexed.
    if mean_loss > 709.0:
        return math.inf
    return math.exp(mean_loss)


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood of a text, in bits, per UTF-8 byte of that text.

    Independent of the tokenizer: the numerator is -log2 P(text) whatever the text was cut into.
    NaN when there are no bytes (nothing was measured).
    """
    if n_bytes <= 0:
        return math.nan
    return total_nll_nats / (math.log(2) * n_bytes)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and English articles, collapse whitespace (SQuAD convention)."""
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both strings are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_tokens(text: str) -> list[str]:
    """Lowercased word tokens (letters, digits, underscore), the unit ROUGE-L counts."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (two-row dynamic program)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0] * (len(b) + 1)
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1: harmonic mean of LCS precision and recall over :func:`rouge_tokens`.

    Two empty texts agree perfectly (1.0); exactly one empty text scores 0.0.
    """
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values (an empty evaluation has no score, not a zero one)."""
    items = list(values)
    return sum(items) / len(items) if items else math.nan


def relative_improvement(candidate: float, champion: float, mode: Literal["min", "max"]) -> float:
    """How much better ``candidate`` is than ``champion`` as a fraction of the champion's value.

    Positive means better in direction ``mode``; 0.05 is "5% better". A zero champion makes the
    ratio undefined, so any strict improvement over it counts as infinitely better.
    """
    if math.isnan(candidate) or math.isnan(champion):
        return math.nan
    gain = champion - candidate if mode == "min" else candidate - champion
    if champion == 0 or math.isinf(champion):
        if gain == 0 or math.isnan(gain):
            return 0.0
        return math.copysign(math.inf, gain)
    return gain / abs(champion)
