"""Offline language identification with py3langid (a modernized langid.py; its model ships in the
wheel, so nothing is downloaded). The detected language and its probability are written to the
document's ``meta`` (``language``, ``language_score``) for the validation gate's language share.
"""

from __future__ import annotations

from collections import Counter

from lmforge.config.curation import LanguageConfig

_identifier = None


def identifier():
    """The process-wide identifier: loading the model takes ~0.6 s, so it is done once."""
    global _identifier
    if _identifier is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _identifier


def detect(text: str, max_chars: int = 2000) -> tuple[str, float]:
    language, score = identifier().classify(text[:max_chars])
    return language, float(score)


class LanguageFilter:
    name = "language"

    def __init__(self, cfg: LanguageConfig) -> None:
        self.cfg = cfg
        self.keep = frozenset(cfg.keep)
        self.counts: Counter = Counter()
        identifier()

    def __call__(self, doc: dict) -> str | None:
        language, score = detect(doc["text"], self.cfg.max_chars)
        doc["meta"]["language"] = language
        doc["meta"]["language_score"] = round(score, 4)
        self.counts[language] += 1
        if len(doc["text"]) < self.cfg.min_chars:
            return None
        if self.keep and language not in self.keep:
            return "language"
        return "language_uncertain" if score < self.cfg.min_score else None
