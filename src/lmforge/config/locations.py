"""Where data is read from: the location keys shared by document, instruction and preference sources.

A ``local``, ``s3``, ``hf`` or ``web`` entry is written with the same keys whether it lists documents
(``data.sources``, :mod:`lmforge.config.data`) or instruction and preference records
(``data.instructions.sources``, ``data.preferences.sources``, :mod:`lmforge.config.instructions`), so
each key is declared once here. These are declarations only: the source classes built on them add
their ``type``, ``name`` and what they do with the records they read.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from lmforge.config.base import Section

NAME = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-\[\]]*$",
             description="Label of this source in the summary and manifest; default TYPE[INDEX].")


def http_urls(urls: list[str]) -> list[str]:
    """``urls`` when each is an http(s) URL with a host; a ValueError naming the first that is not."""
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
    return urls


def _networks(values: list[str]) -> list[str]:
    for value in values:
        ipaddress.ip_network(value, strict=False)  # raises ValueError naming the bad entry
    return values


class FileSelection(Section):
    """Which files of a listing are read, and the largest one read (local disk and S3)."""

    include: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns of files to read (matched against the file name, or the relative "
        "path when the pattern holds a '/'); files of unknown formats are skipped and counted.",
    )
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of files to leave out.")
    max_file_bytes: int = Field(
        256 * 2**20, gt=0,
        description="Largest file, archive member or decompressed stream read; larger ones are skipped "
        "(also the guard against compression bombs).",
    )


class LocalPaths(Section):
    """Files and directories on disk."""

    paths: list[str] = Field(..., min_length=1, description="Files or directories to read (recursively).")
    hidden: bool = Field(False, description="Also read files and directories whose names start with a dot.")


class S3Location(Section):
    """Objects under a bucket prefix; credentials come from the standard AWS chain, never from here."""

    bucket: str = Field(..., min_length=3, description="Bucket name.")
    prefix: str = Field("", description="Key prefix to list.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph...); env AWS_ENDPOINT_URL also works."
    )
    region: str | None = Field(None, description="Region; default from the AWS chain.")
    max_objects: int | None = Field(None, gt=0, description="Most objects read in one run.")


class HFLocation(Section):
    """A Hugging Face ``datasets`` dataset and the split read from it."""

    dataset: str = Field(
        ..., min_length=1,
        description="Hub name (needs network), a builder (`json`, `csv`, `parquet`, `text`) with "
        "`data_files`, or a local directory of data files or of `save_to_disk` output.",
    )
    config_name: str | None = Field(None, description="Dataset configuration (subset) name.")
    data_files: list[str] = Field(default_factory=list, description="Files for a builder dataset.")
    split: str = Field("train")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    streaming: bool = Field(False, description="Iterate without downloading or caching the whole set.")
    max_records: int | None = Field(None, gt=0, description="Most records read.")


class FetchConfig(Section):
    """Politeness and limits of the HTTP fetcher shared by the web and feed sources."""

    user_agent: str = Field("lmforge-collect/0.1", min_length=1,
                            description="User-Agent sent and matched in robots.txt.")
    requests_per_second: float = Field(1.0, gt=0, description="Most requests started per second to one host.")
    concurrency: int = Field(4, ge=1, le=1024, description="Requests in flight across all hosts.")
    concurrency_per_host: int = Field(2, ge=1, le=256, description="Requests in flight to one host.")
    timeout_s: float = Field(15.0, gt=0, description="Connect and read timeout of one request.")
    total_timeout_s: float = Field(60.0, gt=0, description="Most time one response may take to arrive whole.")
    retries: int = Field(2, ge=0, le=100, description="Retries after a connection error, HTTP 429 or 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled for each next one.")
    max_backoff_s: float = Field(30.0, ge=0, description="Cap on one wait, also on a server's Retry-After.")
    max_bytes: int = Field(5 * 2**20, gt=0, description="Largest response body; larger pages are skipped.")
    max_redirects: int = Field(5, ge=0, le=100)


class NetworkFields(Section):
    """What the network sources share: the SSRF guard's exceptions and the fetcher's settings."""

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


def source_labels(sources: list) -> list[str]:
    """The label of each source: its `name`, else ``TYPE[INDEX]``."""
    return [s.name or f"{s.type}[{i}]" for i, s in enumerate(sources)]
