"""Collect stage: gather raw documents from the configured sources into the workspace.

Run it with ``lmforge collect CONFIG`` (or ``python -m lmforge.collect [CONFIG]``). Each source sits
behind the small :class:`Source` protocol and is chosen by its config's ``type``. A source either
contributes all of its documents or, when it fails, none, with its error recorded in the result and
the manifest while the other sources finish. Collection is incremental: documents already in the
shard are kept (ids are content hashes), so a re-run adds nothing new.

Outputs (the contract with later stages):
  ws.raw_dir/docs-00000.parquet   id, text, source, uri, title, fetched_at, content_type, meta (JSON)
  ws.raw_dir/manifest.json        counts, digest, per-source counts, errors
  ws.sft_dir/{train,test}.jsonl   instruction pairs from stdlib docstrings (see InstructionConfig)
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.config.stages import DataConfig, InstructionConfig, LocalSource, StdlibSource
from lmforge.data.stdlib_docs import build_instruction_pairs, iter_stdlib_docs
from lmforge.errors import DataError, LmforgeError
from lmforge.workspace import Workspace, atomic_write_bytes, atomic_write_json, atomic_write_text

SHARD_NAME = "docs-00000.parquet"
DOCUMENT_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("uri", pa.string()),
    ("title", pa.string()), ("fetched_at", pa.string()), ("content_type", pa.string()),
    ("meta", pa.string()),
])
DOCUMENT_COLUMNS = tuple(DOCUMENT_SCHEMA.names)

Progress = Callable[[str, int, int], None]


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_bucket(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key``: the same key lands in the same split forever."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def hash_split(items: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Split items by the hash of their ``id`` into (kept, held out), deterministically.

    With two or more items each side gets at least one, so a tiny corpus still has something to
    train on and something to evaluate on.
    """
    ranked = sorted(items, key=lambda item: (split_bucket(item["id"]), item["id"]))
    cut = sum(1 for item in ranked if split_bucket(item["id"]) < fraction)
    if len(ranked) >= 2:
        cut = min(max(cut, 1), len(ranked) - 1)
    held, kept = ranked[:cut], ranked[cut:]
    return sorted(kept, key=lambda i: i["id"]), sorted(held, key=lambda i: i["id"])


def write_documents(path: Path, rows: list[dict]) -> None:
    """Write rows with the document columns to a Parquet file atomically."""
    table = pa.Table.from_pylist([{c: row[c] for c in DOCUMENT_COLUMNS} for row in rows], schema=DOCUMENT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_documents(path: Path) -> list[dict]:
    return pq.read_table(path, schema=DOCUMENT_SCHEMA).to_pylist()


# ---------------------------------------------------------------- sources


class Source(Protocol):
    """Anything that yields document dicts (id, text, source, uri, title, content_type, meta)."""

    name: str

    def documents(self) -> Iterator[dict]: ...


@dataclass(frozen=True)
class StdlibDocs:
    cfg: StdlibSource
    name: str = "stdlib"

    def documents(self) -> Iterator[dict]:
        return iter_stdlib_docs(list(self.cfg.modules), self.cfg.max_bytes)


@dataclass(frozen=True)
class LocalFiles:
    cfg: LocalSource
    name: str = "local"

    def documents(self) -> Iterator[dict]:
        for path in self._files():
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path, self.cfg.text_field)
            else:
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    yield _document(text, "local", path.resolve().as_uri(), _title_of(path, text),
                                    "text/markdown" if path.suffix == ".md" else "text/plain", {})

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for raw in self.cfg.paths:
            path = Path(raw).expanduser()
            if path.is_file():
                files.append(path)
            elif path.is_dir():
                files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and self._included(p))
            else:
                raise DataError(f"local source path {raw} does not exist",
                                "fix or remove it in data.sources[].paths (paths are relative to the "
                                "directory you run lmforge from)")
        return files

    def _included(self, path: Path) -> bool:
        return any(fnmatch.fnmatch(path.name, pattern) for pattern in self.cfg.include)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[dict]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON ({exc.msg})",
                                "make every line of the .jsonl file one JSON object") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number} has no string field '{text_field}'",
                                "set data.sources[].text_field to the field that holds the text")
            if text.strip():
                meta = {k: v for k, v in record.items() if k != text_field}
                yield _document(text, "local", f"{path.resolve().as_uri()}#L{number}",
                                str(record.get("title") or f"{path.stem}:{number}"), "text/plain", meta)


def _title_of(path: Path, text: str) -> str:
    first = text.lstrip().split("\n", 1)[0].strip()
    return first.lstrip("#").strip() if first.startswith("#") else path.stem


def _document(text: str, source: str, uri: str, title: str, content_type: str, meta: dict) -> dict:
    return {"id": text_id(text), "text": text, "source": source, "uri": uri, "title": title,
            "content_type": content_type, "meta": meta}


_SOURCE_TYPES: dict[str, Callable[[Any], Source]] = {"stdlib": StdlibDocs, "local": LocalFiles}


def make_source(cfg: StdlibSource | LocalSource) -> Source:
    return _SOURCE_TYPES[cfg.type](cfg)


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class CollectResult:
    documents_total: int
    documents_new: int
    bytes: int
    per_source: dict[str, dict[str, int]]
    errors: list[dict[str, str]]
    digest: str
    sft_train: int = 0
    sft_test: int = 0
    shard: str = ""
    manifest: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("manifest")
        return data


def collect(cfg: DataConfig, ws: Workspace, progress: Progress | None = None) -> CollectResult:
    """Read every source, merge new documents into the raw shard, and write the SFT set.

    ``progress(source_label, sources_done, sources_total)`` is called after each source, with
    labels such as ``stdlib[0]`` (type and position in ``cfg.sources``), the keys of ``per_source``.
    The SFT set is written whenever ``cfg.instructions.source`` is ``stdlib``, even for a corpus of
    local files only: fine-tuning needs it and it needs no network.
    """
    shard = ws.raw_dir / SHARD_NAME
    rows = read_documents(shard) if shard.exists() else []
    known = {row["id"] for row in rows}
    fetched_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    per_source: dict[str, dict[str, int]] = {}
    errors: list[dict[str, str]] = []
    new = 0
    for index, source_cfg in enumerate(cfg.sources):
        label = f"{source_cfg.type}[{index}]"
        try:
            docs = list(make_source(source_cfg).documents())
        except LmforgeError as exc:
            errors.append({"source": label, "error": exc.cause, "fix": exc.fix})
            docs = []
        except OSError as exc:  # unreadable file or directory: the source fails, the others go on
            errors.append({"source": label, "error": f"{type(exc).__name__}: {exc}",
                           "fix": "check the path exists and is readable"})
            docs = []
        added = 0
        for doc in docs:
            if doc["id"] in known:
                continue
            known.add(doc["id"])
            rows.append({**doc, "fetched_at": fetched_at, "meta": json.dumps(doc["meta"], sort_keys=True)})
            added += 1
        per_source[label] = {"documents": len(docs), "new": added}
        new += added
        if progress is not None:
            progress(label, index + 1, len(cfg.sources))

    if not rows:
        failures = "; ".join(f"{e['source']}: {e['error']}" for e in errors) or "every source was empty"
        raise DataError(f"no documents were collected ({failures})",
                        "fix the failing source(s) or add a source with text, e.g. `- type: stdlib` "
                        "under data.sources")
    digest = hashlib.sha256("\n".join(sorted(known)).encode()).hexdigest()
    total_bytes = sum(len(row["text"].encode("utf-8")) for row in rows)
    if new:
        write_documents(shard, rows)
    sft_train, sft_test = write_instruction_set(cfg.instructions, ws)
    manifest = {
        "shards": [{"path": SHARD_NAME, "documents": len(rows)}],
        "documents": len(rows), "bytes": total_bytes, "digest": digest, "updated_at": fetched_at,
        "last_run": {"documents_new": new, "per_source": per_source, "errors": errors},
        "sources": [s.model_dump(mode="json") for s in cfg.sources],
        "sft": {"train": sft_train, "test": sft_test, "source": cfg.instructions.source},
        "python": sys.version.split()[0],
    }
    atomic_write_json(ws.raw_dir / "manifest.json", manifest)
    return CollectResult(len(rows), new, total_bytes, per_source, errors, digest,
                         sft_train, sft_test, str(shard), manifest)


def write_instruction_set(cfg: InstructionConfig, ws: Workspace) -> tuple[int, int]:
    """Write the SFT train/test JSONL files; returns their record counts (0, 0 when disabled)."""
    if cfg.source == "none":
        return 0, 0
    pairs = build_instruction_pairs(cfg.max_records)
    train, test = hash_split(pairs, cfg.test_fraction)
    for name, records in (("train.jsonl", train), ("test.jsonl", test)):
        lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        atomic_write_text(ws.sft_dir / name, lines)
    return len(train), len(test)


def main(argv: list[str] | None = None) -> int:
    from lmforge.config.loader import load_config

    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else None)
    result = collect(cfg.data, Workspace.from_env().ensure())
    print(json.dumps(result.as_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
