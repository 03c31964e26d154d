"""The collect stage's parts: one module per source type and per concern.

Sources (each a class with ``units(ctx)``, chosen by its config's ``type``): :mod:`.stdlib`,
:mod:`.local`, :mod:`.web`, :mod:`.feed`, :mod:`.s3`, :mod:`.hf`. Shared machinery: :mod:`.formats`
(file formats), :mod:`.archives` (compression, safe archive members), :mod:`.textdecode`,
:mod:`.html`, :mod:`.books` (PDF, EPUB), :mod:`.fetch` and :mod:`.netguard` (the polite, SSRF-safe
HTTP fetcher), :mod:`.parallel` (work shards on processes or Ray), :mod:`.state` and
:mod:`.shards` (the raw corpus, incremental state, crash-safe commits), :mod:`.runner` (sources
in parallel). The stage entry point is :func:`lmforge.stages.collect.collect`.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmforge.collection.types import Source

# type -> "module:Class"; imported on use, so boto3 or datasets load only when configured.
SOURCE_CLASSES = {
    "stdlib": "lmforge.collection.stdlib:StdlibDocs",
    "local": "lmforge.collection.local:LocalFiles",
    "web": "lmforge.collection.web:WebCrawl",
    "feed": "lmforge.collection.feed:Feeds",
    "s3": "lmforge.collection.s3:S3Objects",
    "hf": "lmforge.collection.hf:HFDataset",
}


def make_source(cfg: Any) -> Source:
    module, name = SOURCE_CLASSES[cfg.type].split(":")
    return getattr(importlib.import_module(module), name)(cfg)
