"""The ``data`` section: what the collect stage reads, one model per source type (``data.sources``).

Every source type may be listed several times; each entry's ``name`` (default ``TYPE[INDEX]``) is its
label in the summary and the manifest. The keys that say where data is (paths, bucket, dataset...) are
declared once in :mod:`lmforge.config.locations`, shared with the instruction and preference sources
of :mod:`lmforge.config.instructions`. Network sources (``web``, ``feed``) share :class:`FetchConfig`,
the politeness and safety settings of the one HTTP fetcher. :class:`DataConfig` is the section
itself, composed into the pipeline config by :mod:`lmforge.config.pipeline`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section
from lmforge.config.instructions import InstructionConfig, PreferenceConfig
from lmforge.config.locations import NAME as _NAME
from lmforge.config.locations import FetchConfig as FetchConfig  # re-exported: scripts import it from here
from lmforge.config.locations import FileSelection, HFLocation, LocalPaths, NetworkFields, S3Location, http_urls
from lmforge.config.locations import source_labels as source_labels  # re-exported: the collect stage's labels


class StdlibSource(Section):
    """Docstrings of the Python standard library installed on this machine: no network needed."""

    type: Literal["stdlib"] = "stdlib"
    name: str | None = _NAME
    max_bytes: int = Field(1_000_000, gt=0, description="Stop collecting after this many bytes of text.")
    modules: list[str] = Field(
        default_factory=list,
        description="Top-level stdlib modules to read; empty means every importable pure-Python module.",
    )


class _FileFields(FileSelection):
    # Declarations shared by the two file-reading document sources (local disk and S3); no behaviour.
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.csv/.parquet records.")
    title_field: str | None = Field("title", description="Field holding a record's title, if any.")
    meta_fields: list[str] = Field(
        default_factory=list, description="Record fields kept as metadata; empty keeps every other field."
    )
    max_document_bytes: int = Field(
        16 * 2**20, gt=0,
        description="Largest document: a .txt/.md/.html file, a JSONL/CSV line or a record's text; larger "
        "ones are skipped and counted (`too_large`) before they are held in memory whole.",
    )


class LocalSource(_FileFields, LocalPaths):
    """Files on disk: .txt .md .html .json .jsonl .csv .parquet .pdf .epub, plain or in .gz .zst .zip .tar.gz."""

    type: Literal["local"] = "local"
    name: str | None = _NAME


class WebSource(NetworkFields):
    """A polite crawler from seed URLs and/or sitemaps."""

    type: Literal["web"] = "web"
    name: str | None = _NAME
    seeds: list[str] = Field(default_factory=list, description="Start URLs (depth 0).")
    sitemaps: list[str] = Field(default_factory=list, description="sitemap.xml URLs whose pages are depth 0.")
    max_pages: int = Field(100, gt=0, description="Most pages requested in one run.")
    max_depth: int = Field(2, ge=0, description="Links followed from a start page; 0 reads the start pages only.")
    same_site: bool = Field(True, description="Follow links only to the hosts of the seeds and sitemaps.")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of URLs never requested.")
    content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml", "text/plain"],
        description="Media types kept; other responses are skipped before their body is read.",
    )

    @field_validator("seeds", "sitemaps")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return http_urls(value)

    @model_validator(mode="after")
    def _has_start(self) -> WebSource:
        if not self.seeds and not self.sitemaps:
            raise ValueError("a web source needs at least one of `seeds` or `sitemaps`")
        return self


class FeedSource(NetworkFields):
    """RSS 2.0 and Atom feeds; each entry's link is fetched for its full text."""

    type: Literal["feed"] = "feed"
    name: str | None = _NAME
    urls: list[str] = Field(..., min_length=1, description="Feed URLs.")
    follow_links: bool = Field(
        True, description="Fetch each entry's link for the article's main text; off uses the entry's own content."
    )
    max_entries: int = Field(200, gt=0, description="Most entries read from one feed.")

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return http_urls(value)


class S3Source(_FileFields, S3Location):
    """Objects under a bucket prefix (any S3-compatible store); credentials from the standard AWS chain."""

    type: Literal["s3"] = "s3"
    name: str | None = _NAME


class HFSource(HFLocation):
    """A Hugging Face `datasets` dataset: local files, a saved dataset directory, or a hub name."""

    type: Literal["hf"] = "hf"
    name: str | None = _NAME
    text_field: str = Field("text")
    title_field: str | None = Field(None)
    meta_fields: list[str] = Field(
        default_factory=list, description="Fields kept as metadata; empty keeps every other field."
    )
    chunk_rows: int = Field(1000, gt=0, description="Records per incremental unit (re-read and compared as one).")


SourceConfig = Annotated[
    StdlibSource | LocalSource | WebSource | FeedSource | S3Source | HFSource, Field(discriminator="type")
]
SOURCE_TYPES = ("stdlib", "local", "web", "feed", "s3", "hf")


def _stdlib_only() -> list[SourceConfig]:
    """The default sources: the installed standard library alone (typed for the field's union)."""
    return [StdlibSource()]


class ParallelConfig(Section):
    """How large inputs (many files, big S3 prefixes) are split into work shards and spread out."""

    backend: Literal["auto", "serial", "processes", "ray"] = Field(
        "auto",
        description="`auto`: serial below `min_files`, Ray when an address is set and the input reaches "
        "`ray_min_files`, else a local process pool.",
    )
    workers: int = Field(0, ge=0, le=1024, description="Parallel workers; 0 uses every CPU of this machine.")
    # A worker process costs about a second to start (imports, parser warm-up) while a small file
    # takes about half a millisecond to read: a pool pays off from a few thousand files on.
    min_files: int = Field(2000, ge=1, description="Fewer files than this are read in the source's own thread.")
    chunk_files: int = Field(64, ge=1, description="Files per work shard.")
    chunk_bytes: int = Field(32 * 2**20, gt=0, description="Bytes per work shard; a larger file streams alone.")
    ray_address: str | None = Field(None, description="Ray cluster for `auto`/`ray` (env RAY_ADDRESS also works).")
    ray_min_files: int = Field(20_000, ge=1, description="`auto` uses Ray from this many files on.")


class DataConfig(Section):
    """The collect stage's section: the document sources, the SFT and preference sets, and the raw shards."""

    sources: list[SourceConfig] = Field(
        default_factory=_stdlib_only,
        min_length=1,
        description="Where documents come from; each entry is chosen by its `type`.",
    )
    instructions: InstructionConfig = Field(default_factory=InstructionConfig)
    preferences: PreferenceConfig = Field(default_factory=PreferenceConfig)
    source_concurrency: int = Field(4, ge=1, le=256, description="Sources collected at the same time.")
    shard_max_documents: int = Field(10_000, gt=0, description="Documents per raw Parquet shard (a commit point).")
    shard_max_bytes: int = Field(64 * 2**20, gt=0, description="Text bytes per raw Parquet shard (a commit point).")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    progress_interval_s: float = Field(10.0, ge=0, description="Seconds between progress lines on stderr; 0 is silent.")

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        labels = source_labels(self.sources)
        if len(set(labels)) != len(labels):
            raise ValueError(f"data.sources names must be unique, got {labels}")
        return self

