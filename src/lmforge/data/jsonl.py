"""Reading the JSONL files lmforge writes itself (SFT and preference sets, frozen evaluation sets).

Users' own files go through :mod:`lmforge.data.record_files`, which skips and reports bad records;
a file lmforge wrote is read strictly: a bad line is an error naming ``path:line`` and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.core.errors import DataError


def json_lines(path: Path, fix: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a line that is not JSON raises a DataError."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not JSON ({exc})", fix) from exc
