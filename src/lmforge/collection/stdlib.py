"""The ``stdlib`` source: docstrings of the installed Python standard library, one unit per module.

The documents come from :mod:`lmforge.data.stdlib_docs`; this adapter only groups them into units
(``stdlib://MODULE``) so that a re-run recognises an unchanged module by the hash of its documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from itertools import groupby

from lmforge.collection.types import Fingerprint, SourceContext, Unit, make_document
from lmforge.config.data import StdlibSource
from lmforge.data.stdlib_docs import iter_stdlib_docs


class StdlibDocs:
    def __init__(self, cfg: StdlibSource) -> None:
        self.cfg = cfg

    def units(self, ctx: SourceContext) -> Iterator[Unit]:
        docs = iter_stdlib_docs(list(self.cfg.modules), self.cfg.max_bytes)
        for module, group in groupby(docs, key=lambda d: d["meta"]["module"]):
            rows = [make_document(d["text"], source=d["source"], uri=d["uri"], title=d["title"],
                                  content_type=d["content_type"], meta=d["meta"]) for d in group]
            digest = hashlib.sha256("".join(r["id"] for r in rows).encode()).hexdigest()
            uri = f"stdlib://{module}"
            prior = ctx.known(uri)
            fingerprint = Fingerprint(digest)
            yield Unit(uri, fingerprint, None if prior and prior.fingerprint.hash == digest else rows)
