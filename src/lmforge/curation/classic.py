"""The classic NLP steps, off by default: word segmentation (jieba for Chinese), stop-word removal
and stemming (Snowball). They help keyword indexes and bag-of-words baselines and would harm a
language model, so they run last, after dedup, and only when listed in ``curation.steps``.

After ``segment_words`` a document is its tokens joined by single spaces; the later steps work on
those tokens.
"""

from __future__ import annotations

import re
from collections import Counter

from lmforge.config.curation import ClassicConfig
from lmforge.core.errors import ConfigError

_HAN = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[\u3400-\u9fff]+|\w+(?:['’]\w+)?|[^\w\s]", re.UNICODE)
# A compact English list (the usual Snowball/NLTK core) and the commonest Chinese function words.
DEFAULT_STOP_WORDS = frozenset([
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are",
    "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by",
    "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from",
    "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him",
    "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me",
    "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once", "only",
    "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so",
    "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there",
    "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was",
    "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with",
    "would", "you", "your", "yours", "yourself", "yourselves", "的", "了", "是", "在", "和", "也", "就",
    "都", "而", "及", "与", "着", "或", "一个", "没有", "我们", "你们", "他们", "这", "那", "之", "于", "以", "其"
])


def segment(text: str) -> list[str]:
    """Words of ``text``: jieba for runs of Chinese characters, word characters elsewhere."""
    words: list[str] = []
    for token in _WORD.findall(text):
        if _HAN.match(token):
            import jieba

            jieba.setLogLevel(60)  # its dictionary-loading chatter is not ours to print
            words.extend(w for w in jieba.lcut(token) if w.strip())
        else:
            words.append(token)
    return words


class SegmentWords:
    name = "segment_words"

    def __init__(self, cfg: ClassicConfig) -> None:
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        words = segment(doc["text"])
        doc["text"] = " ".join(words)
        self.counts["words"] += len(words)
        return None if words else "empty"


class RemoveStopwords:
    name = "remove_stopwords"

    def __init__(self, cfg: ClassicConfig) -> None:
        self.stop = frozenset(w.lower() for w in cfg.stop_words) if cfg.stop_words is not None else DEFAULT_STOP_WORDS
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        words = doc["text"].split()
        kept = [w for w in words if w.lower() not in self.stop]
        self.counts["removed"] += len(words) - len(kept)
        doc["text"] = " ".join(kept)
        return None if kept else "empty"


class Stem:
    name = "stem"

    def __init__(self, cfg: ClassicConfig) -> None:
        import snowballstemmer

        try:
            self.stemmer = snowballstemmer.stemmer(cfg.language)
        except KeyError:
            raise ConfigError(f"no Snowball stemmer for curation.classic.language {cfg.language!r}",
                              f"use one of {', '.join(snowballstemmer.algorithms())}") from None
        self.counts: Counter = Counter()

    def __call__(self, doc: dict) -> str | None:
        words = doc["text"].split()
        stems = self.stemmer.stemWords([w.lower() for w in words])
        self.counts["stemmed"] += sum(1 for w, s in zip(words, stems) if w.lower() != s)
        doc["text"] = " ".join(stems)
        return None
