"""The ``validation`` section: the data-quality gate (Great Expectations) a corpus must pass before training.

Thresholds on the curated corpus (size, lengths, duplicates, languages, leftover PII, overlap with
evaluation sets), extra user expectations, and the checks of the tokenized datasets.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from lmforge.config.base import Section, check_range


class UserExpectation(Section):
    """One Great Expectations expectation added to the curated-corpus suite."""

    type: str = Field(..., pattern=r"^expect_[a-z0-9_]+$", description="GX expectation type, e.g. "
                      "expect_column_values_to_match_regex.")
    kwargs: dict = Field(default_factory=dict, description="Its arguments, e.g. {column: text, regex: '\\\\w'}.")
    name: str | None = Field(None, description="Name in reports; default the type.")


class TokenizedChecks(Section):
    """Thresholds of the tokenized-dataset suite (run by the tokenize stage)."""

    min_rows: int = Field(1, ge=1, description="Rows every split of every built dataset must have.")
    max_unknown_rate: float = Field(0.001, ge=0, le=1, description="Largest share of unknown tokens.")
    min_mean_length_fraction: float = Field(
        0.05, ge=0, le=1, description="Mean non-padding length of SFT rows, as a share of seq_len, at least.")
    min_supervised_tokens: int = Field(1, ge=1, description="Every SFT row trains on at least this many tokens.")


class RecordChecks(Section):
    """Thresholds of the instruction/chat and preference suites (run with the corpus suite when a set exists)."""

    min_records: int = Field(1, ge=1, description="Fail when a set (train and test together) has fewer records.")
    min_chars: int = Field(1, ge=0, description="Every record's turns hold at least this many characters in all.")
    max_chars: int = Field(100_000, gt=0, description="... and at most this many.")
    max_turns: int = Field(512, ge=1, description="Most turns a record may have.")
    max_duplicate_fraction: float = Field(0.0, ge=0, le=1, description="Allowed share of records whose rendered "
                                          "conversation repeats another record's (across train and test).")
    max_pii_records: int = Field(0, ge=0, description="Records that may still hold PII after scrubbing.")

    @model_validator(mode="after")
    def _bounds(self) -> RecordChecks:
        check_range(self.min_chars, self.max_chars, "min_chars", "max_chars")
        return self


class ValidationConfig(Section):
    """The validate stage's section: the Great Expectations gate on the curated corpus (and the
    tokenized datasets' checks, run by the tokenize stage)."""

    enabled: bool = Field(True, description="Run the Great Expectations gate before training.")
    min_documents: int = Field(50, ge=1, description="Fail when the curated corpus has fewer documents.")
    min_chars: int = Field(1, ge=0, description="Every document must be at least this long.")
    max_chars: int = Field(50_000, gt=0, description="Every document must be at most this long.")
    max_duplicate_fraction: float = Field(0.0, ge=0, le=1, description="Allowed share of duplicate texts.")
    allowed_sources: list[str] = Field(
        default_factory=list,
        description="Source types a document may come from (e.g. [stdlib, local]); empty skips the check.",
    )
    languages: list[str] = Field(default_factory=list, description="Languages documents may be in (from "
                                 "curation's language step); empty skips the check.")
    min_language_share: float = Field(0.95, ge=0, le=1, description="Share of documents in `languages`.")
    max_pii_documents: int = Field(0, ge=0, description="Documents that may still hold PII after scrubbing.")
    max_eval_overlap_documents: int = Field(0, ge=0, description="Training documents that may overlap an "
                                            "evaluation set (held-out split or SFT test set).")
    expectations: list[UserExpectation] = Field(default_factory=list, description="Extra GX expectations.")
    data_docs: bool = Field(True, description="Build Great Expectations Data Docs in the workspace.")
    tokenized: TokenizedChecks = Field(default_factory=TokenizedChecks)
    records: RecordChecks = Field(default_factory=RecordChecks, description="Checks of the SFT and preference "
                                  "sets: role order, empty turns, assistant turns, length, duplicates, chosen != rejected.")

    @model_validator(mode="after")
    def _bounds(self) -> ValidationConfig:
        check_range(self.min_chars, self.max_chars, "min_chars", "max_chars")
        return self
