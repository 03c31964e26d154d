"""Content digests of files, read in blocks: the one home of the streaming SHA-256 that collection,
curation, tokenization and the storage cache use to tell whether a file changed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

BLOCK = 1 << 20  # 1 MiB reads: a large file never sits in memory whole


def sha256_stream(fh: BinaryIO) -> str:
    """The hex SHA-256 of everything left in the binary file object ``fh``."""
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    with path.open("rb") as fh:
        return sha256_stream(fh)
