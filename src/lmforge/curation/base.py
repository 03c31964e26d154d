"""The one shape every curation step has, and the table that builds steps from their names.

A step is a callable on one document (a dict of the document columns, ``meta`` as a dict): a
*transform* rewrites ``doc["text"]`` and returns None; a *filter* returns the reason it removes the
document (a transform returns one too when nothing is left). Both count what they changed in
``counts``. Steps are built fresh in every worker from the config, so they never cross processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lmforge.config.curation import STEP_PHASES, CurationConfig
from lmforge.curation import classic, clean, decontaminate, language, pii, quality
from lmforge.curation.decontaminate import EvalIndex


class Step(Protocol):
    name: str
    counts: Counter

    def __call__(self, doc: dict) -> str | None: ...


@dataclass(frozen=True)
class Context:
    """What corpus-wide passes learned and what per-document steps need from outside a document."""

    boilerplate: dict[str, set[int]] = field(default_factory=dict)
    eval_index: EvalIndex | None = None


def steps_of_phase(cfg: CurationConfig, phases: tuple[int, ...]) -> list[str]:
    return [name for name in cfg.steps if STEP_PHASES[name] in phases]


def build_steps(names: list[str], cfg: CurationConfig, ctx: Context) -> list[Step]:
    builders: dict[str, Callable[[], Step]] = {
        "normalize": lambda: clean.Normalize(cfg.normalize),
        "fix_mojibake": clean.FixMojibake,
        "strip_html": clean.StripHtml,
        "clean_whitespace": clean.CleanWhitespace,
        "boilerplate": lambda: clean.RemoveBoilerplate(ctx.boilerplate, cfg.boilerplate),
        "length": lambda: quality.LengthFilter(cfg.min_chars, cfg.max_chars),
        "language": lambda: language.LanguageFilter(cfg.language),
        "quality": lambda: quality.QualityFilter(cfg.quality),
        "pii": lambda: pii.ScrubPii(cfg.pii),
        "decontaminate": lambda: decontaminate.Decontaminate(ctx.eval_index or EvalIndex([], cfg.decontaminate),
                                                             cfg.decontaminate),
        "segment_words": lambda: classic.SegmentWords(cfg.classic),
        "remove_stopwords": lambda: classic.RemoveStopwords(cfg.classic),
        "stem": lambda: classic.Stem(cfg.classic),
    }
    return [builders[name]() for name in names]
