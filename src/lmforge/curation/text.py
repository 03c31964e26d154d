"""Word tokens and their 64-bit hashes, shared by the quality, decontamination and dedup steps.

Words are hashed once per document with xxh64 (stable across processes and machines, unlike
Python's ``hash``), and word n-grams are hashed from those numbers with numpy, so a document's
shingles cost a few vector operations instead of one string hash per n-gram.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

# A Han/kana character is a word of its own: Chinese and Japanese do not separate words by spaces,
# and single characters make usable shingles for near-duplicate detection.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_STEP = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it permutes uint64
_CACHE_LIMIT = 200_000
_cache: dict[str, int] = {}


def tokens(text: str) -> list[str]:
    """Lowercased word tokens (CJK characters one by one), punctuation dropped."""
    return TOKEN.findall(text.lower())


def word_hashes(words: list[str]) -> np.ndarray:
    """uint64 hash of every word; common words come from a bounded per-process cache."""
    if len(_cache) > _CACHE_LIMIT:
        _cache.clear()
    out = []
    for word in words:
        value = _cache.get(word)
        if value is None:
            value = _cache[word] = xxhash.xxh64_intdigest(word.encode("utf-8", "surrogatepass"))
        out.append(value)
    return np.array(out, dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of ``n`` consecutive words (empty when there are fewer words)."""
    if len(hashes) < n:
        return np.empty(0, dtype=np.uint64)
    out = hashes[: len(hashes) - n + 1].copy()
    for offset in range(1, n):
        # uint64 arithmetic wraps, which is what a hash wants.
        out = out * _STEP + hashes[offset: len(hashes) - n + 1 + offset]
    return out


def text_key(text: str) -> int:
    """The exact-dedup key: xxh64 of the lowercased text with whitespace collapsed."""
    return xxhash.xxh64_intdigest(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"))
