"""The ``data.instructions`` and ``data.preferences`` sections: where fine-tuning records come from.

``data.instructions.sources`` lists the places supervised fine-tuning records are read from, each
chosen by its ``type``: ``stdlib`` (question/answer pairs derived from the installed standard
library's docstrings, the built-in default), and ``local``, ``s3``, ``hf`` and ``web``, which take
the same location keys as the document sources (:mod:`lmforge.config.locations`) plus a ``format``.
``data.preferences.sources`` lists preference records (prompt, chosen, rejected) the same way; it is
empty by default. The collect stage reads both (:mod:`lmforge.collection.instructions`), normalizes
every record to one canonical form (:mod:`lmforge.data.chat_formats`) and writes the train/test
splits. The old switch ``data.instructions.source: stdlib|none`` still loads.

    data:
      instructions:
        sources:
          - {type: local, paths: [data/chat.jsonl]}          # format detected per file
          - {type: hf, dataset: json, data_files: [data/alpaca.json], format: alpaca}
      preferences:
        sources: [{type: local, paths: [data/prefs.jsonl]}]
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section
from lmforge.config.locations import (
    NAME,
    FileSelection,
    HFLocation,
    LocalPaths,
    NetworkFields,
    S3Location,
    http_urls,
    source_labels,
)

RecordFormat = Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion", "preference"]
SFT_FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion")

_FORMAT: Any = Field(  # one declaration for every record source
    "auto",
    description="Record format: `auto` detects it per file from its first records; `openai` (`messages`), "
    "`sharegpt` (`conversations` of `from`/`value`), `alpaca` (`instruction`/`input`/`output`), "
    "`prompt_completion`, or `preference` (`prompt`/`chosen`/`rejected`, under data.preferences only).",
)


class StdlibPairs(Section):
    """Question/answer pairs derived from the installed standard library's docstrings; no network needed."""

    type: Literal["stdlib"] = "stdlib"
    name: str | None = NAME


class LocalRecords(FileSelection, LocalPaths):
    """Record files on disk: .jsonl/.ndjson, or .json (an array, one object, or JSON lines); plain, .gz or .zst."""

    type: Literal["local"] = "local"
    name: str | None = NAME
    format: RecordFormat = _FORMAT


class S3Records(FileSelection, S3Location):
    """Record files under a bucket prefix (any S3-compatible store), in the formats a local source reads."""

    type: Literal["s3"] = "s3"
    name: str | None = NAME
    format: RecordFormat = _FORMAT


class HFRecords(HFLocation):
    """The rows of a Hugging Face `datasets` split (e.g. `dataset: json` with `data_files`), one record each."""

    type: Literal["hf"] = "hf"
    name: str | None = NAME
    format: RecordFormat = _FORMAT


class WebRecords(NetworkFields):
    """Record files at http(s) URLs, fetched by the polite, SSRF-safe fetcher (raise fetch.max_bytes for big ones)."""

    type: Literal["web"] = "web"
    name: str | None = NAME
    urls: list[str] = Field(..., min_length=1, description="URLs of record files (.jsonl, .json, optionally .gz).")
    format: RecordFormat = _FORMAT

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return http_urls(value)


InstructionSource = Annotated[StdlibPairs | LocalRecords | S3Records | HFRecords | WebRecords,
                              Field(discriminator="type")]
PreferenceSource = Annotated[LocalRecords | S3Records | HFRecords | WebRecords, Field(discriminator="type")]
RecordSource = LocalRecords | S3Records | HFRecords | WebRecords


def _stdlib_pairs() -> list[InstructionSource]:
    """The default: the built-in stdlib pairs alone (typed for the field's union)."""
    return [StdlibPairs()]


def _unique(section: str, sources: list) -> None:
    labels = source_labels(sources)
    if len(set(labels)) != len(labels):
        raise ValueError(f"data.{section}.sources names must be unique, got {labels}: give each entry its own `name`")


class InstructionConfig(Section):
    """The supervised fine-tuning set: its sources and its train/test split."""

    sources: list[InstructionSource] = Field(
        default_factory=_stdlib_pairs,
        description="Where SFT records come from; each entry is chosen by its `type`. The default is the "
        "built-in stdlib pairs; an empty list writes no SFT set.",
    )
    source: Literal["stdlib", "none"] | None = Field(
        None,
        description="The old switch, still read: `stdlib` is `sources: [{type: stdlib}]`, `none` is `sources: []`. "
        "Prefer `sources`.",
    )
    max_records: int = Field(2000, gt=0, description="Most question/answer pairs derived by a `stdlib` source.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share held out for evaluation (by hash of each id).")

    @model_validator(mode="before")
    @classmethod
    def _old_switch(cls, data: Any) -> Any:
        """Turn ``source`` into ``sources``; refuse the two when they say different things."""
        if not isinstance(data, dict) or data.get("source") is None:
            return data
        switch, sources = data["source"], data.get("sources")
        if sources is None:
            return {**data, "sources": [] if switch == "none" else [{"type": "stdlib"}]}
        types = [s.get("type") if isinstance(s, dict) else getattr(s, "type", None) for s in sources]
        if switch == "none" and sources:
            raise ValueError("`source: none` says no SFT set but `sources` lists some; remove `source` "
                             "(write `sources: []` for no SFT set)")
        if switch == "stdlib" and "stdlib" not in types:
            raise ValueError("`source: stdlib` asks for the stdlib pairs but `sources` has no `type: stdlib` entry; "
                             "remove `source` and list `- {type: stdlib}` under sources if you want them too")
        return data

    @model_validator(mode="after")
    def _check_sources(self) -> InstructionConfig:
        _unique("instructions", self.sources)
        for label, src in zip(source_labels(self.sources), self.sources):
            if getattr(src, "format", None) == "preference":
                raise ValueError(f"data.instructions source {label} has `format: preference`; move it to "
                                 "data.preferences.sources (preference records train DPO, not SFT)")
        return self


class PreferenceConfig(Section):
    """The preference set (prompt, chosen, rejected) for preference tuning: its sources and split."""

    sources: list[PreferenceSource] = Field(
        default_factory=list, description="Where preference records come from; empty (the default) writes none."
    )
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share held out for evaluation (by hash of each id).")

    @model_validator(mode="after")
    def _check_sources(self) -> PreferenceConfig:
        _unique("preferences", self.sources)
        for label, src in zip(source_labels(self.sources), self.sources):
            if src.format not in ("auto", "preference"):
                raise ValueError(f"data.preferences source {label} has `format: {src.format}`, an SFT format; "
                                 "use `format: preference` (or `auto`), or move it to data.instructions.sources")
        return self
