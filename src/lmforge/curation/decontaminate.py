"""Decontamination: training text must not contain the evaluation sets.

Every evaluation record (the SFT test set, chats or pairs, and the preference test set) is cut into
word n-grams (``ngram`` words, as GPT-3 and Llama did; shorter records of at least ``min_words``
words are matched whole). A document holding one of them is removed (``mode: document``) or has the
overlapping words cut out (``mode: span``); a training record holding one is removed whole
(:func:`record_contaminated`; the record curation also indexes the held-out documents).
The held-out perplexity split needs no index of its own: near-dedup runs over the whole corpus
before the split, so no held-out document has a near twin in training.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from lmforge.config.curation import DecontaminationConfig
from lmforge.curation.records import eval_texts_of, match_texts
from lmforge.curation.text import TOKEN, ngram_hashes, tokens, word_hashes

_TRAILING = re.compile(r"[^\w\s]*")  # punctuation right after a cut span goes with it


class EvalIndex:
    """Hashed word n-grams of the evaluation texts, grouped by n-gram length."""

    def __init__(self, texts: list[str], cfg: DecontaminationConfig) -> None:
        grams: dict[int, set[int]] = {}
        for text in texts:
            hashes = word_hashes(TOKEN.findall(text.lower()))
            if len(hashes) >= cfg.ngram:
                grams.setdefault(cfg.ngram, set()).update(ngram_hashes(hashes, cfg.ngram).tolist())
            elif len(hashes) >= cfg.min_words:
                grams.setdefault(len(hashes), set()).update(ngram_hashes(hashes, len(hashes)).tolist())
        self.by_length = {n: np.array(sorted(v), dtype=np.uint64) for n, v in sorted(grams.items())}
        self.texts = len(texts)

    def __bool__(self) -> bool:
        return bool(self.by_length)

    def covered(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean per word: inside some n-gram that an evaluation text also holds."""
        covered = np.zeros(len(hashes), dtype=bool)
        for n, known in self.by_length.items():
            grams = ngram_hashes(hashes, n)
            if not len(grams):
                continue
            for start in np.flatnonzero(np.isin(grams, known)):
                covered[start: start + n] = True
        return covered


def eval_texts(sft_test: Path, fields: list[str]) -> list[str]:
    """The evaluation texts of every record of a test set (none when it does not exist): the
    configured fields of a legacy pair, the non-system turns of a chat or preference record."""
    if not sft_test.exists():
        return []
    texts: list[str] = []
    for line in sft_test.read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.extend(eval_texts_of(json.loads(line), fields))
    return texts


def record_contaminated(record: dict, index: EvalIndex) -> bool:
    """Whether any turn of a training record holds an n-gram of the evaluation texts in ``index``."""
    return bool(index) and any(index.covered(word_hashes(tokens(text))).any() for text in match_texts(record))


class Decontaminate:
    name = "decontaminate"

    def __init__(self, index: EvalIndex, cfg: DecontaminationConfig) -> None:
        self.index = index
        self.cfg = cfg
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        if not self.index:
            return None
        text = doc["text"]
        matches = list(TOKEN.finditer(text))
        hashes = word_hashes([m.group(0).lower() for m in matches])
        covered = self.index.covered(hashes)
        if not covered.any():
            return None
        if self.cfg.mode == "document":
            return "contaminated"
        pieces, cursor, spans = [], 0, 0
        for start, stop in _runs(covered):
            pieces.append(text[cursor: matches[start].start()])
            cursor = matches[stop - 1].end()
            trailing = _TRAILING.match(text, cursor)  # matches (maybe empty) wherever it starts
            if trailing is not None:
                cursor = trailing.end()
            spans += 1
        pieces.append(text[cursor:])
        doc["text"] = "".join(pieces).strip()
        self.counts["spans"] += spans
        # What is left of a document that was mostly evaluation text is not worth training on.
        left = int((~covered).sum())
        return None if left >= self.cfg.min_words else "contaminated"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True values."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
