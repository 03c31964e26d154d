"""The ``data`` section: what the collect stage reads, one model per source type (``data.sources``).

Every source type may be listed several times; each entry's ``name`` (default ``TYPE[INDEX]``) is its
label in the summary and the manifest. Network sources (``web``, ``feed``) share :class:`FetchConfig`,
the politeness and safety settings of the one HTTP fetcher. :class:`DataConfig` is the section
itself, composed into the pipeline config by :mod:`lmforge.config.pipeline`.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section

_NAME = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-\[\]]*$",
              description="Label of this source in the summary and manifest; default TYPE[INDEX].")


def _http_urls(urls: list[str]) -> list[str]:
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
    return urls


def _networks(values: list[str]) -> list[str]:
    for value in values:
        ipaddress.ip_network(value, strict=False)  # raises ValueError naming the bad entry
    return values


class StdlibSource(Section):
    """Docstrings of the Python standard library installed on this machine: no network needed."""

    type: Literal["stdlib"] = "stdlib"
    name: str | None = _NAME
    max_bytes: int = Field(1_000_000, gt=0, description="Stop collecting after this many bytes of text.")
    modules: list[str] = Field(
        default_factory=list,
        description="Top-level stdlib modules to read; empty means every importable pure-Python module.",
    )


class _FileFields(Section):
    # Declarations shared by the two file-reading sources (local disk and S3); no behaviour.
    include: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns of files to read (matched against the file name, or the relative "
        "path when the pattern holds a '/'); files of unknown formats are skipped and counted.",
    )
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of files to leave out.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.csv/.parquet records.")
    title_field: str | None = Field("title", description="Field holding a record's title, if any.")
    meta_fields: list[str] = Field(
        default_factory=list, description="Record fields kept as metadata; empty keeps every other field."
    )
    max_file_bytes: int = Field(
        256 * 2**20, gt=0,
        description="Largest file, archive member or decompressed stream read; larger ones are skipped "
        "(also the guard against compression bombs).",
    )


class LocalSource(_FileFields):
    """Files on disk: .txt .md .html .json .jsonl .csv .parquet .pdf .epub, plain or in .gz .zst .zip .tar.gz."""

    type: Literal["local"] = "local"
    name: str | None = _NAME
    paths: list[str] = Field(..., min_length=1, description="Files or directories to read (recursively).")
    hidden: bool = Field(False, description="Also read files and directories whose names start with a dot.")


class FetchConfig(Section):
    """Politeness and limits of the HTTP fetcher shared by the web and feed sources."""

    user_agent: str = Field("lmforge-collect/0.1", min_length=1,
                            description="User-Agent sent and matched in robots.txt.")
    requests_per_second: float = Field(1.0, gt=0, description="Most requests started per second to one host.")
    concurrency: int = Field(4, ge=1, description="Requests in flight across all hosts.")
    concurrency_per_host: int = Field(2, ge=1, description="Requests in flight to one host.")
    timeout_s: float = Field(15.0, gt=0, description="Connect and read timeout of one request.")
    total_timeout_s: float = Field(60.0, gt=0, description="Most time one response may take to arrive whole.")
    retries: int = Field(2, ge=0, description="Retries after a connection error, HTTP 429 or 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled for each next one.")
    max_backoff_s: float = Field(30.0, ge=0, description="Cap on one wait, also on a server's Retry-After.")
    max_bytes: int = Field(5 * 2**20, gt=0, description="Largest response body; larger pages are skipped.")
    max_redirects: int = Field(5, ge=0)


class _NetworkFields(Section):
    # Declarations shared by the two network sources; no behaviour.
    allow_private: bool = Field(
        False,
        description="Allow private, loopback, link-local and metadata addresses (checked after DNS "
        "resolution and after every redirect). Off by default: crawlers are SSRF vectors.",
    )
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDR networks allowed although private (e.g. an intranet, or 127.0.0.1/32 in tests).",
    )
    fetch: FetchConfig = Field(default_factory=FetchConfig)

    @field_validator("allow_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        return _networks(value)


class WebSource(_NetworkFields):
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
        return _http_urls(value)

    @model_validator(mode="after")
    def _has_start(self) -> WebSource:
        if not self.seeds and not self.sitemaps:
            raise ValueError("a web source needs at least one of `seeds` or `sitemaps`")
        return self


class FeedSource(_NetworkFields):
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
        return _http_urls(value)


class S3Source(_FileFields):
    """Objects under a bucket prefix (any S3-compatible store); credentials from the standard AWS chain."""

    type: Literal["s3"] = "s3"
    name: str | None = _NAME
    bucket: str = Field(..., min_length=3, description="Bucket name.")
    prefix: str = Field("", description="Key prefix to list.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph...); env AWS_ENDPOINT_URL also works."
    )
    region: str | None = Field(None, description="Region; default from the AWS chain.")
    max_objects: int | None = Field(None, gt=0, description="Most objects read in one run.")


class HFSource(Section):
    """A Hugging Face `datasets` dataset: local files, a saved dataset directory, or a hub name."""

    type: Literal["hf"] = "hf"
    name: str | None = _NAME
    dataset: str = Field(
        ..., min_length=1,
        description="Hub name (needs network), a builder (`json`, `csv`, `parquet`, `text`) with "
        "`data_files`, or a local directory of data files or of `save_to_disk` output.",
    )
    config_name: str | None = Field(None, description="Dataset configuration (subset) name.")
    data_files: list[str] = Field(default_factory=list, description="Files for a builder dataset.")
    split: str = Field("train")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    text_field: str = Field("text")
    title_field: str | None = Field(None)
    meta_fields: list[str] = Field(
        default_factory=list, description="Fields kept as metadata; empty keeps every other field."
    )
    streaming: bool = Field(False, description="Iterate without downloading or caching the whole set.")
    max_records: int | None = Field(None, gt=0, description="Most records read.")
    chunk_rows: int = Field(1000, gt=0, description="Records per incremental unit (re-read and compared as one).")


SourceConfig = Annotated[
    StdlibSource | LocalSource | WebSource | FeedSource | S3Source | HFSource, Field(discriminator="type")
]
SOURCE_TYPES = ("stdlib", "local", "web", "feed", "s3", "hf")


def _stdlib_only() -> list[SourceConfig]:
    """The default sources: the installed standard library alone (typed for the field's union)."""
    return [StdlibSource()]


class InstructionConfig(Section):
    """The supervised fine-tuning set derived from stdlib docstrings."""

    max_records: int = Field(2000, gt=0, description="Most instruction/response pairs to derive.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share held out for evaluation (by hash).")
    source: Literal["stdlib", "none"] = Field(
        "stdlib",
        description="Where the pairs come from: `stdlib` derives them from the installed standard "
        "library's docstrings whatever the document sources are; `none` writes no SFT set.",
    )


class ParallelConfig(Section):
    """How large inputs (many files, big S3 prefixes) are split into work shards and spread out."""

    backend: Literal["auto", "serial", "processes", "ray"] = Field(
        "auto",
        description="`auto`: serial below `min_files`, Ray when an address is set and the input reaches "
        "`ray_min_files`, else a local process pool.",
    )
    workers: int = Field(0, ge=0, description="Parallel workers; 0 uses every CPU of this machine.")
    # A worker process costs about a second to start (imports, parser warm-up) while a small file
    # takes about half a millisecond to read: a pool pays off from a few thousand files on.
    min_files: int = Field(2000, ge=1, description="Fewer files than this are read in the source's own thread.")
    chunk_files: int = Field(64, ge=1, description="Files per work shard.")
    chunk_bytes: int = Field(32 * 2**20, gt=0, description="Bytes per work shard; a larger file streams alone.")
    ray_address: str | None = Field(None, description="Ray cluster for `auto`/`ray` (env RAY_ADDRESS also works).")
    ray_min_files: int = Field(20_000, ge=1, description="`auto` uses Ray from this many files on.")


class DataConfig(Section):
    """The collect stage's section: the sources, the SFT set derived beside them, and the raw shards."""

    sources: list[SourceConfig] = Field(
        default_factory=_stdlib_only,
        min_length=1,
        description="Where documents come from; each entry is chosen by its `type`.",
    )
    instructions: InstructionConfig = Field(default_factory=InstructionConfig)
    source_concurrency: int = Field(4, ge=1, description="Sources collected at the same time.")
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


def source_labels(sources: list) -> list[str]:
    """The label of each source: its `name`, else ``TYPE[INDEX]``."""
    return [s.name or f"{s.type}[{i}]" for i, s in enumerate(sources)]
