"""The ``hf`` source: a Hugging Face ``datasets`` dataset, from local files or the hub.

``dataset`` is a hub name (read when the network allows; with ``HF_HUB_OFFLINE=1`` the source
reports that it cannot reach the hub), a builder such as ``json``/``csv``/``parquet``/``text`` with
``data_files``, or a local directory (data files, or the output of ``save_to_disk``). With
``streaming`` the records are iterated without downloading or caching the whole set. Records are
grouped into units of ``chunk_rows`` (``hf://NAME/SPLIT#rows=START-END``); a chunk whose documents
hash the same as last time keeps its documents. Caches go under the workspace, not ``~/.cache``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from lmforge.collection.formats import FormatOptions, record_document
from lmforge.collection.types import Fingerprint, SourceContext, Unit
from lmforge.config.data import HFSource
from lmforge.core.errors import DataError


def load(cfg: HFSource, cache_dir: Path) -> Any:
    """The configured split as a (possibly iterable) dataset; our DataError when it cannot be had."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    local = Path(cfg.dataset).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()
                               or (local / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            return loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(cfg.dataset, name=cfg.config_name, data_files=cfg.data_files or None,
                                     split=cfg.split, revision=cfg.revision, streaming=cfg.streaming,
                                     cache_dir=str(cache_dir))
    except ConnectionError as exc:
        raise DataError(f"dataset {cfg.dataset} is not reachable ({exc})",
                        "allow network access (unset HF_HUB_OFFLINE) or point `dataset` at local files") from None
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise DataError(f"dataset {cfg.dataset} split {cfg.split!r} cannot be loaded: {type(exc).__name__}: {exc}",
                        "check dataset, data_files, config_name and split") from None


class HFDataset:
    def __init__(self, cfg: HFSource) -> None:
        self.cfg = cfg
        self.opts = FormatOptions("hf", cfg.text_field, cfg.title_field, tuple(cfg.meta_fields))

    def units(self, ctx: SourceContext) -> Iterator[Unit]:
        cfg = self.cfg
        dataset = load(cfg, ctx.scratch_dir / "hf")
        columns = dataset.column_names
        if columns is not None and cfg.text_field not in columns:
            raise DataError(f"dataset {cfg.dataset} has no column '{cfg.text_field}' (columns: {', '.join(columns)})",
                            "set text_field on the hf source to the column that holds the text")
        if not cfg.streaming and hasattr(dataset, "__len__"):
            ctx.expect(-(-min(len(dataset), cfg.max_records or len(dataset)) // cfg.chunk_rows))
        rows = islice(iter(dataset), cfg.max_records)
        base = f"hf://{cfg.dataset}" + (f"/{cfg.config_name}" if cfg.config_name else "") + f"/{cfg.split}"
        start = 0
        while True:
            chunk = list(islice(rows, cfg.chunk_rows))
            if not chunk:
                return
            yield self._unit(base, start, chunk, ctx)
            start += len(chunk)

    def _unit(self, base: str, start: int, records: list[dict], ctx: SourceContext) -> Unit:
        docs = []
        for offset, record in enumerate(records):
            doc = record_document(record, f"{base}#{start + offset}", self.opts, ctx.tally, "text/plain")
            if doc is not None:
                docs.append(doc)
        uri = f"{base}#rows={start}-{start + len(records) - 1}"
        digest = hashlib.sha256("".join(d["id"] for d in docs).encode()).hexdigest()
        prior = ctx.known(uri)
        unchanged = prior is not None and prior.fingerprint.hash == digest
        return Unit(uri, Fingerprint(digest), None if unchanged else docs)
