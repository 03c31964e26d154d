"""The ``curation`` section: which cleaning, filtering and deduplication steps run, and their settings.

Curation is a list of named steps (``curation.steps``), each configured by its own small model;
thresholds that cannot make sense (a minimum above its maximum, a fraction outside [0, 1]) are
rejected when the config loads, so a bad setting never reaches a long run.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section, check_range

# Every step and the phase it runs in. Per-document steps run in list order inside a phase;
# phases run in this order because boilerplate needs every document's lines first, dedup needs
# every document's signature, and the classic steps rewrite text after dedup has judged it.
STEP_PHASES: dict[str, int] = {
    "normalize": 0, "fix_mojibake": 0, "strip_html": 0, "clean_whitespace": 0,
    "boilerplate": 1,
    "length": 2, "language": 2, "quality": 2, "pii": 2, "decontaminate": 2,
    "exact_dedup": 3, "near_dedup": 3,
    "segment_words": 4, "remove_stopwords": 4, "stem": 4,
}
_PHASE_NAMES = ["cleaning", "boilerplate", "per-document filters", "deduplication", "classic NLP"]
DEFAULT_STEPS = ["normalize", "fix_mojibake", "strip_html", "clean_whitespace", "boilerplate", "length",
                 "language", "quality", "pii", "decontaminate", "exact_dedup", "near_dedup"]


class BoilerplateConfig(Section):
    """Lines repeated across many documents of one source (headers, footers, cookie banners)."""

    min_documents: int = Field(5, ge=2, description="A line is boilerplate when at least this many documents "
                               "of one source hold it ...")
    min_fraction: float = Field(0.05, ge=0, le=1, description="... and at least this share of that source's "
                                "documents.")
    min_line_chars: int = Field(20, ge=1, description="Shorter lines (blank, `}`, `Returns:`) are never boilerplate.")


class QualityConfig(Section):
    """Gopher- and C4-style document heuristics; a document failing one is removed as `quality.<check>`.

    The defaults are looser than Gopher's web-text values (min_words 50, mean word length 3-10,
    alpha words 0.8, 2 stop words, line/char duplicate 0.3/0.2, top 2/3/4-gram 0.20/0.18/0.16,
    duplicate 5..10-gram 0.15..0.10), which would drop a third of technical documentation such as
    the built-in docstring corpus; set those values for web crawls.
    """

    min_words: int = Field(5, ge=0)
    max_words: int = Field(100_000, gt=0)
    min_mean_word_length: float = Field(2.0, ge=0)
    max_mean_word_length: float = Field(15.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="`#` and ellipses per word.")
    min_alpha_word_fraction: float = Field(0.5, ge=0, le=1, description="Share of words with a letter.")
    max_bullet_line_fraction: float = Field(0.9, ge=0, le=1)
    max_ellipsis_line_fraction: float = Field(0.3, ge=0, le=1)
    min_punctuated_line_fraction: float = Field(
        0.0, ge=0, le=1, description="C4: share of lines ending in terminal punctuation (0 disables).")
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1)
    max_duplicate_line_char_fraction: float = Field(0.3, ge=0, le=1)
    max_top_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.3, 3: 0.3, 4: 0.3},
        description="n -> largest share of characters one repeated word n-gram may cover.")
    max_duplicate_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.4, 6: 0.38, 7: 0.36, 8: 0.34, 9: 0.32, 10: 0.3},
        description="n -> largest share of characters covered by word n-grams that occur more than once.")
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    min_stop_words: int = Field(1, ge=0, description="Gopher: documents with fewer stop words are not prose.")
    max_bad_phrase_lines: int = Field(0, ge=0, description="C4: lines with `lorem ipsum`, `javascript` or a "
                                      "cookie notice tolerated before removal.")

    @model_validator(mode="after")
    def _ranges(self) -> QualityConfig:
        check_range(self.min_words, self.max_words, "min_words", "max_words")
        check_range(self.min_mean_word_length, self.max_mean_word_length, "min_mean_word_length",
                     "max_mean_word_length")
        for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            for n, fraction in getattr(self, name).items():
                if not 1 <= n <= 20 or not 0 <= fraction <= 1:
                    raise ValueError(f"{name} maps n-gram sizes 1..20 to fractions in [0, 1], got {n}: {fraction}")
        return self


class LanguageConfig(Section):
    keep: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps all.")
    min_score: float = Field(0.5, ge=0, le=1, description="Documents identified with less confidence are removed.")
    max_chars: int = Field(2000, gt=0, description="Characters of each document the identifier reads.")
    min_chars: int = Field(200, ge=0, description="Shorter documents are labelled but never removed: a "
                           "sentence or two is too little to identify a language reliably.")

    @field_validator("keep")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        for code in value:
            if not re.fullmatch(r"[a-z]{2,3}", code):
                raise ValueError(f"{code!r} is not an ISO 639 code such as 'en' or 'zh'")
        return value


NormalForm = Literal["NFC", "NFKC", "none"]
PiiKind = Literal["email", "phone", "ip_address", "credit_card", "secret"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "ip_address", "credit_card", "secret")


class PiiConfig(Section):
    kinds: list[PiiKind] = Field(default_factory=lambda: list(PII_KINDS))
    keep_private_ips: bool = Field(True, description="Loopback, private and documentation addresses name nobody.")


class DecontaminationConfig(Section):
    """Overlap with evaluation sets (the SFT test set): word n-grams, as in GPT-3 and Llama."""

    ngram: int = Field(13, ge=3, description="Word n-gram length that counts as overlap.")
    min_words: int = Field(8, ge=3, description="Evaluation texts shorter than `ngram` but at least this long "
                           "are matched whole; shorter ones are ignored.")
    mode: Literal["document", "span"] = Field(
        "span", description="`document` removes a contaminated document; `span` cuts the overlapping words out.")
    fields: list[str] = Field(default_factory=lambda: ["instruction", "response"],
                              description="Fields of each evaluation record to match.")

    @model_validator(mode="after")
    def _sizes(self) -> DecontaminationConfig:
        check_range(self.min_words, self.ngram, "min_words", "ngram")
        return self


class NearDedupConfig(Section):
    """MinHash over word shingles with LSH banding; candidates are verified on estimated Jaccard."""

    shingle_size: int = Field(5, ge=1, description="Words per shingle.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity that counts as duplicate.")
    bands: int | None = Field(None, ge=1, description="LSH bands; default chosen from threshold and num_perm.")
    rows: int | None = Field(None, ge=1, description="Rows per band (with `bands`).")
    verify: bool = Field(True, description="Drop LSH candidates whose estimated Jaccard is below "
                         "threshold - verify_slack.")
    verify_slack: float = Field(0.1, ge=0, lt=1, description="Tolerance of the verification: the MinHash "
                                "estimate has a standard error of about 0.035 at 0.8 with 128 permutations.")
    previous_versions: int = Field(3, ge=0, description="Earlier curated versions in the workspace to dedup against.")
    seed: int = 1

    @model_validator(mode="after")
    def _bands(self) -> NearDedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows ({self.bands * self.rows}) exceeds num_perm ({self.num_perm})")
        return self


class ClassicConfig(Section):
    """Classic NLP steps (segment_words, remove_stopwords, stem): for keyword indexes, not for LMs."""

    language: str = Field("english", description="Snowball stemmer language.")
    stop_words: list[str] | None = Field(None, description="Stop words to remove; default a built-in "
                                         "English + Chinese list.")


RecordStep = Literal["pii", "length", "decontaminate", "exact_dedup", "near_dedup"]
RECORD_STEPS: tuple[RecordStep, ...] = ("pii", "length", "decontaminate", "exact_dedup", "near_dedup")


class RecordCurationConfig(Section):
    """Curation of an instruction/chat or preference set (``sft/`` or ``preferences/``, both splits).

    ``pii`` and ``length`` run per record in list order; then exact and near dedup over the
    rendered conversation (test records first, so a train record repeating a test record is the one
    dropped); ``decontaminate`` runs last on train records only, once the held-out documents are
    known. PII, decontamination and MinHash settings are the document steps' (``curation.pii``,
    ``curation.decontaminate``, ``curation.near_dedup``); a contaminated record is always dropped
    whole (cutting words out of a turn would leave a conversation that no longer makes sense).
    """

    steps: list[RecordStep] = Field(default_factory=lambda: list(RECORD_STEPS), description=(
        "Record curation steps: " + ", ".join(RECORD_STEPS) + "; empty copies the set as collected."))
    min_chars: int = Field(1, ge=0, description="Drop records whose turns hold fewer characters in all.")
    max_chars: int = Field(50_000, gt=0, description="Drop records whose turns hold more characters in all.")
    max_turns: int = Field(256, ge=1, description="Drop records with more turns (system and tool turns count).")

    @model_validator(mode="after")
    def _valid(self) -> RecordCurationConfig:
        check_range(self.min_chars, self.max_chars, "min_chars", "max_chars")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"a record curation step is listed twice: {self.steps}")
        return self


def _preference_steps() -> RecordCurationConfig:
    # Pairs that share a prompt and a chosen answer but differ in the rejected one are distinct
    # training signal (several rejected answers per prompt), so near-dedup is off by default.
    return RecordCurationConfig(steps=["pii", "length", "decontaminate", "exact_dedup"])


class CurationConfig(Section):
    """The curate stage's section: the steps in order, document bounds, and each step's settings."""

    steps: list[str] = Field(default_factory=lambda: list(DEFAULT_STEPS), description=(
        "Curation steps in order (see `lmforge config schema`): " + ", ".join(STEP_PHASES)))
    normalize: NormalForm = Field("NFKC", description="Unicode normalization form.")
    min_chars: int = Field(40, ge=0, description="Drop documents shorter than this.")
    max_chars: int = Field(20_000, gt=0, description="Drop documents longer than this.")
    heldout_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of documents (chosen by hash) held out for perplexity."
    )
    boilerplate: BoilerplateConfig = Field(default_factory=BoilerplateConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    decontaminate: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    classic: ClassicConfig = Field(default_factory=ClassicConfig)
    instructions: RecordCurationConfig = Field(
        default_factory=RecordCurationConfig, description="Curation of the SFT set (data.instructions), both splits.")
    preferences: RecordCurationConfig = Field(
        default_factory=_preference_steps, description="Curation of the preference set (data.preferences).")
    samples_per_reason: int = Field(3, ge=0, description="Removed documents kept in report.json per reason.")
    ray_min_documents: int = Field(
        200_000, ge=0, description="Run the per-shard work as Ray tasks from this many raw documents on "
        "(with more than one shard); 0 never uses Ray.")

    @model_validator(mode="after")
    def _consistent(self) -> CurationConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        seen: set[str] = set()
        phase = 0
        for name in self.steps:
            if name not in STEP_PHASES:
                raise ValueError(f"unknown curation step {name!r}; known steps: {', '.join(STEP_PHASES)}")
            if name in seen:
                raise ValueError(f"curation step {name!r} is listed twice")
            if STEP_PHASES[name] < phase:
                raise ValueError(f"curation step {name!r} ({_PHASE_NAMES[STEP_PHASES[name]]}) must come before "
                                 f"the {_PHASE_NAMES[phase]} steps")
            seen.add(name)
            phase = STEP_PHASES[name]
        return self
