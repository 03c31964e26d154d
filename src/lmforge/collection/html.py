"""HTML to text: the main text of a page (boilerplate and tags gone), its title, links and hints.

Main-text extraction is trafilatura's (navigation, headers, footers, scripts and comments dropped);
for pages too small for its heuristics it falls back to the visible text of the page's block
elements. :class:`PageParser` (stdlib ``html.parser``, tolerant of broken markup) reads what the
crawler needs besides the text: links, ``<link rel=canonical>``, ``<base href>`` and the robots
meta tag (``noindex`` keeps a page out of the corpus, ``nofollow`` keeps its links out of the crawl).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

_BLOCKS = frozenset({"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
                     "section", "article", "blockquote", "pre", "dd", "dt", "hr", "main", "figcaption"})
_HIDDEN = frozenset({"script", "style", "noscript", "template", "svg", "head", "iframe", "object"})
_BOILERPLATE = frozenset({"nav", "header", "footer", "aside", "form", "menu"})
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANKS = re.compile(r"\n\s*\n+")


@dataclass
class PageInfo:
    title: str = ""
    links: list[str] = field(default_factory=list)
    canonical: str | None = None
    base: str | None = None
    noindex: bool = False
    nofollow: bool = False
    text: str = ""  # visible text outside boilerplate elements


class PageParser(HTMLParser):
    """Collects :class:`PageInfo` in one pass (subclassing is html.parser's API)."""

    def __init__(self, skip_boilerplate: bool = True) -> None:
        super().__init__(convert_charrefs=True)
        self.info = PageInfo()
        self._skip = _HIDDEN | (_BOILERPLATE if skip_boilerplate else frozenset())
        self._depth = 0  # inside hidden or boilerplate elements
        self._in_title = False
        self._title: list[str] = []
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k.lower(): (v or "") for k, v in attrs}
        self._read_hints(tag, values)
        if tag == "title":
            self._in_title = True
        elif tag in self._skip and tag not in ("head",):
            self._depth += 1
        if tag in _BLOCKS:
            self._parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._read_hints(tag, {k.lower(): (v or "") for k, v in attrs})
        if tag in _BLOCKS:
            self._parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._skip and tag != "head" and self._depth:
            self._depth -= 1
        if tag in _BLOCKS:
            self._parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)
        elif not self._depth:
            self._parts.append(data)

    def _read_hints(self, tag: str, values: dict[str, str]) -> None:
        info = self.info
        if tag in ("a", "area") and values.get("href"):
            if "nofollow" not in values.get("rel", "").lower().split():
                info.links.append(values["href"].strip())
        elif tag == "link" and "canonical" in values.get("rel", "").lower().split() and values.get("href"):
            info.canonical = values["href"].strip()
        elif tag == "base" and values.get("href") and info.base is None:
            info.base = values["href"].strip()
        elif tag == "meta" and values.get("name", "").lower() in ("robots", "lmforge"):
            directives = values.get("content", "").lower().replace(" ", "").split(",")
            info.noindex = info.noindex or "noindex" in directives or "none" in directives
            info.nofollow = info.nofollow or "nofollow" in directives or "none" in directives

    def result(self) -> PageInfo:
        self.info.title = " ".join("".join(self._title).split())
        self.info.text = tidy("".join(self._parts))
        return self.info


def tidy(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def parse_page(html: str, skip_boilerplate: bool = True) -> PageInfo:
    parser = PageParser(skip_boilerplate)
    parser.feed(html)
    parser.close()
    return parser.result()


def visible_text(html: str) -> tuple[str, str]:
    """(title, text) of every visible element, boilerplate included (EPUB chapters, fallback)."""
    info = parse_page(html, skip_boilerplate=False)
    return info.title, info.text


def main_text(html: str, url: str | None = None, info: PageInfo | None = None) -> tuple[str, str]:
    """(title, main text) of an HTML page; empty text when the page has none."""
    info = info or parse_page(html)
    try:
        import trafilatura
        from trafilatura.settings import Document

        # trafilatura logs every page it finds too short; that is expected here, not news.
        logging.getLogger("trafilatura").setLevel(logging.ERROR)
        # Metadata extraction (dates, authors) would double the cost; the title comes from our parser.
        doc = trafilatura.bare_extraction(html, url=url, with_metadata=False, include_comments=False,
                                          include_tables=True)
    except (ValueError, TypeError, AttributeError):  # malformed markup trafilatura's tree chokes on
        doc = None
    # A Document unless as_dict=True (deprecated, never passed): isinstance also rules out None.
    text = tidy(doc.text) if isinstance(doc, Document) and doc.text else ""
    if not text:
        text = info.text  # a page too small for trafilatura's heuristics: its visible text
    return info.title, text
