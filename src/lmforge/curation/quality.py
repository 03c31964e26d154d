"""Quality filters in the style of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

:class:`QualityFilter` runs the heuristics in a fixed order and removes a document with the reason
``quality.<check>`` of the first one it fails; every threshold is in :class:`QualityConfig`.
Repetition is measured with hashed word n-grams (numpy), so the cost per document is a handful of
vector operations rather than a Python loop per n-gram. :class:`LengthFilter` bounds characters.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from lmforge.config.curation import QualityConfig
from lmforge.curation.text import ngram_hashes, word_hashes

_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")
_BULLET = ("•", "-", "*", "‣", "·", "–")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", ":")
_BAD_PHRASE = re.compile(r"lorem ipsum|enable javascript|javascript is disabled|uses? cookies|cookie policy|"
                         r"accept (?:all )?cookies", re.I)


class LengthFilter:
    name = "length"

    def __init__(self, min_chars: int, max_chars: int) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        size = len(doc["text"])
        if size < self.min_chars:
            return "too_short"
        return "too_long" if size > self.max_chars else None


class QualityFilter:
    name = "quality"

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.stop_words = frozenset(w.lower() for w in cfg.stop_words)
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        words = text.split()
        lines = [line for line in text.split("\n") if line.strip()]
        for check in (self._words, self._symbols, self._lines, self._line_repetition):
            reason = check(text, words, lines)
            if reason:
                return "quality." + reason
        return self._ngram_repetition(text, words)

    def _words(self, text: str, words: list[str], lines: list[str]) -> str | None:
        cfg = self.cfg
        if not cfg.min_words <= len(words) <= cfg.max_words:
            return "word_count"
        mean = sum(len(w) for w in words) / len(words) if words else 0.0
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"
        if words and len(_ALPHA_WORD.findall(text)) / len(words) < cfg.min_alpha_word_fraction:
            return "alpha_words"
        if cfg.min_stop_words:
            found = 0
            for word in words:
                if word.lower().strip(".,;:!?()\"'") in self.stop_words:
                    found += 1
                    if found >= cfg.min_stop_words:
                        break
            else:
                return "stop_words"
        return None

    def _symbols(self, text: str, words: list[str], lines: list[str]) -> str | None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if words and symbols / len(words) > self.cfg.max_symbol_word_ratio:
            return "symbol_ratio"
        return None

    def _lines(self, text: str, words: list[str], lines: list[str]) -> str | None:
        cfg = self.cfg
        if not lines:
            return None
        stripped = [line.strip() for line in lines]
        if sum(s.startswith(_BULLET) for s in stripped) / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
        if sum(s.endswith(("...", "…")) for s in stripped) / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
        minimum = cfg.min_punctuated_line_fraction
        if minimum and sum(s.endswith(_TERMINAL) for s in stripped) / len(lines) < minimum:
            return "punctuated_lines"
        if len(_BAD_PHRASE.findall(text)) > cfg.max_bad_phrase_lines:
            return "bad_phrases"
        return None

    def _line_repetition(self, text: str, words: list[str], lines: list[str]) -> str | None:
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            seen.add(line)
        if lines and dup_lines / len(lines) > self.cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
        if dup_chars / max(len(text), 1) > self.cfg.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
        return None

    def _ngram_repetition(self, text: str, words: list[str]) -> str | None:
        if len(words) < 2:
            return None
        lower = [w.lower() for w in words]
        hashes = word_hashes(lower)
        lengths = np.fromiter((len(w) for w in lower), dtype=np.int64, count=len(lower))
        total = int(lengths.sum()) or 1
        for n, limit in sorted(self.cfg.max_top_ngram_char_fraction.items()):
            grams = ngram_hashes(hashes, n)
            if len(grams) < 2:
                continue
            _, first, counts = np.unique(grams, return_index=True, return_counts=True)
            top = int(counts.argmax())
            if counts[top] > 1:
                # Characters of the most frequent n-gram times its count, as in Gopher.
                chars = int(lengths[first[top]: first[top] + n].sum()) * int(counts[top])
                if chars / total > limit:
                    return f"quality.top_{n}gram"
        for n, limit in sorted(self.cfg.max_duplicate_ngram_char_fraction.items()):
            if _duplicate_fraction(hashes, lengths, n, total) > limit:
                return f"quality.duplicate_{n}gram"
        return None


def _duplicate_fraction(hashes: np.ndarray, lengths: np.ndarray, n: int, total: int) -> float:
    """Share of word characters covered by n-grams that already occurred earlier in the document."""
    grams = ngram_hashes(hashes, n)
    if len(grams) < 2:
        return 0.0
    _, first = np.unique(grams, return_index=True)
    repeat = np.ones(len(grams), dtype=bool)
    repeat[first] = False
    if not repeat.any():
        return 0.0
    # Mark every word covered by a repeated n-gram: +1 where one starts, -1 n words later.
    marks = np.zeros(len(hashes) + 1, dtype=np.int64)
    starts = np.flatnonzero(repeat)
    np.add.at(marks, starts, 1)
    np.add.at(marks, starts + n, -1)
    covered = np.cumsum(marks[:-1]) > 0
    return float(lengths[covered].sum()) / total
