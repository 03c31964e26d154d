"""Frozen evaluation sets: the exact held-out text, SFT test records and reference tokenizer that every
candidate of one model name is scored on, as a directory with a content digest.

Layout of a set directory (a user may assemble one by hand for ``evaluation.frozen_set: PATH``)::

    heldout.jsonl      {"text": ...} per line: the documents scored for loss and bits per byte
    sft_test.jsonl     held-out SFT records as collected (chats or instruction/response pairs): exact match, ROUGE-L
    tokenizer/         optional: the tokenizer of the first model (the unit of its per-token metrics)
    manifest.json      written by lmforge: digest, counts, provenance (not part of the digest)

The digest covers every file but the manifest, so a set that was edited after freezing is refused
rather than silently scored. Where sets live and how they reach the registry is
:mod:`lmforge.evaluation.frozen_store`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.core.errors import DataError
from lmforge.core.workspace import atomic_dir
from lmforge.data.jsonl import json_lines
from lmforge.data.sft import read_sft

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HELDOUT_FILE = "heldout.jsonl"
SFT_FILE = "sft_test.jsonl"
TOKENIZER_DIR = "tokenizer"
MANIFEST = "manifest.json"
_FIX = "freeze a new set (evaluation.frozen_set: auto with a new registry.model_name) or point frozen_set at an intact copy"


@dataclass(frozen=True)
class FrozenSet:
    path: Path
    digest: str
    texts: list[str]
    records: list[dict[str, Any]]
    tokenizer_fingerprint: str | None  # of tokenizer/, when the set holds one

    def describe(self) -> dict[str, Any]:
        """What reports and hand-offs record about the set (never the text itself)."""
        return {
            "digest": self.digest,
            "path": str(self.path),
            "documents": len(self.texts),
            "bytes": sum(len(t.encode("utf-8")) for t in self.texts),
            "records": len(self.records),
            "tokenizer": self.tokenizer_fingerprint,
        }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short digest of what decides how text becomes token ids: vocabulary, merges, normalization.

    Two tokenizers with one fingerprint cut any text into the same ids, so per-token metrics of
    their models are comparable. Padding and truncation settings are left out: calls change them.
    """
    if tokenizer.is_fast:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())  # type: ignore[attr-defined]  # fast ones have it
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def set_digest(path: Path) -> str:
    """sha256 over every file of the set but the manifest (relative path and content)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def write_frozen_set(dest: Path, texts: list[str], records: list[dict[str, Any]],
                     tokenizer: PreTrainedTokenizerBase | None, provenance: dict[str, Any]) -> FrozenSet:
    """Write a set to ``dest`` in one atomic step and return it (loaded back, digest checked)."""
    if not texts or not records:
        raise DataError(f"refusing to freeze an evaluation set with {len(texts)} documents and {len(records)} "
                        "instructions", "collect and curate enough data for a held-out split first")
    with atomic_dir(dest) as tmp:
        (tmp / HELDOUT_FILE).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        (tmp / SFT_FILE).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        manifest = {"digest": set_digest(tmp), "documents": len(texts), "records": len(records),
                    "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None, **provenance}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return load_frozen_set(dest)


def load_frozen_set(path: Path, expected_digest: str | None = None) -> FrozenSet:
    """Read a set directory; refuse one whose files no longer match its manifest or ``expected_digest``."""
    path = Path(path)
    for name in (HELDOUT_FILE, SFT_FILE):
        if not (path / name).is_file():
            raise DataError(f"{path} is not a frozen evaluation set: {path / name} does not exist",
                            "set evaluation.frozen_set to a directory holding heldout.jsonl and sft_test.jsonl, or 'auto'")
    digest = set_digest(path)
    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else {}
    for wanted, what in ((manifest.get("digest"), "its manifest"), (expected_digest, "the registry")):
        if wanted and wanted != digest:
            raise DataError(f"frozen evaluation set {path} has digest {digest[:12]}, but {what} says {wanted[:12]}: "
                            "its files changed after it was frozen", _FIX)
    texts = _read_texts(path / HELDOUT_FILE)
    records = read_sft(path / SFT_FILE)
    if not texts or not records:
        raise DataError(f"frozen evaluation set {path} holds {len(texts)} documents and {len(records)} instructions",
                        "both files need at least one line")
    fingerprint = manifest.get("tokenizer")
    if fingerprint is None and (path / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(path / TOKENIZER_DIR, local_files_only=True))
    return FrozenSet(path, digest, texts, records, fingerprint)


def _read_texts(path: Path) -> list[str]:
    fix = 'write one {"text": ...} object per line'
    texts = []
    for number, row in json_lines(path, fix):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise DataError(f"{path}:{number} is not an object with a non-empty string `text`", fix)
        texts.append(row["text"])
    return texts
