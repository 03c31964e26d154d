"""Books: PDF (text layer through pypdf) and EPUB (the spine's XHTML chapters in reading order).

Each book is one document whose title comes from the book's own metadata when it has one. A PDF
without a text layer (a scan) yields no text and is counted as ``empty``; an encrypted PDF that
does not open with the empty password is counted as ``encrypted``.
"""

from __future__ import annotations

import io
import logging
import posixpath
import zipfile
from collections.abc import Iterator
from urllib.parse import unquote
from xml.etree import ElementTree

from lmforge.collection.html import tidy, visible_text
from lmforge.collection.textdecode import decode_text
from lmforge.collection.types import Tally, make_document

_OPF = "{http://www.idpf.org/2007/opf}"
_DC = "{http://purl.org/dc/elements/1.1/}"
_CONTAINER = "{urn:oasis:names:tc:opendocument:xmlns:container}"


def pdf_documents(data: bytes, uri: str, stem: str, source: str, tally: Tally) -> Iterator[dict]:
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings are about the file, counted below
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            tally.skip("encrypted", uri, "PDF needs a password")
            return
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or stem
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types on malformed input; each is a counted skip
        tally.skip("unreadable", uri, f"PDF: {type(exc).__name__}: {exc}")
        return
    text = tidy("\n\n".join(pages))
    if not text:
        tally.skip("empty", uri, "PDF has no text layer")
        return
    yield make_document(text, source=source, uri=uri, title=str(title), content_type="application/pdf",
                        meta={"pages": len(pages)})


def epub_documents(data: bytes, uri: str, stem: str, source: str, tally: Tally) -> Iterator[dict]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as book:
            opf_path = _rootfile(book)
            opf = ElementTree.fromstring(book.read(opf_path))
            chapters = _spine(opf, posixpath.dirname(opf_path))
            texts = []
            for chapter in chapters:
                if chapter not in book.namelist():
                    continue
                html = decode_text(book.read(chapter), tally, f"{uri}!/{chapter}")
                if html:
                    texts.append(visible_text(html)[1])
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError, OSError) as exc:
        tally.skip("unreadable", uri, f"EPUB: {type(exc).__name__}: {exc}")
        return
    text = "\n\n".join(t for t in texts if t)
    if not text:
        tally.skip("empty", uri, "EPUB has no readable chapters")
        return
    meta: dict[str, str | int] = {key: value for key, value in (("author", _dc(opf, "creator")),
                                                                 ("language", _dc(opf, "language"))) if value}
    meta["chapters"] = len(texts)
    yield make_document(text, source=source, uri=uri, title=_dc(opf, "title") or stem,
                        content_type="application/epub+zip", meta=meta)


def _rootfile(book: zipfile.ZipFile) -> str:
    container = ElementTree.fromstring(book.read("META-INF/container.xml"))
    rootfile = container.find(f".//{_CONTAINER}rootfile")
    if rootfile is None or not rootfile.get("full-path"):
        raise KeyError("META-INF/container.xml names no rootfile")
    return str(rootfile.get("full-path"))


def _spine(opf: ElementTree.Element, base: str) -> list[str]:
    """Chapter paths inside the zip, in reading order."""
    hrefs = {item.get("id"): item.get("href") for item in opf.iter(f"{_OPF}item")}
    paths = []
    for ref in opf.iter(f"{_OPF}itemref"):
        href = hrefs.get(ref.get("idref"))
        if href:
            paths.append(posixpath.normpath(posixpath.join(base, unquote(href.split("#", 1)[0]))))
    return paths


def _dc(opf: ElementTree.Element, field: str) -> str:
    node = opf.find(f".//{_DC}{field}")
    return (node.text or "").strip() if node is not None else ""
