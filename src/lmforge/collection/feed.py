"""The ``feed`` source: RSS 2.0, RSS 1.0 and Atom feeds (news), entries followed through the fetcher.

Each entry is one unit, keyed by its link: with ``follow_links`` the linked article is fetched by
the same polite, SSRF-safe fetcher as the crawler (robots.txt, pacing, conditional requests) and
its main text is the document; when the article cannot be fetched (the refusal is counted) or
``follow_links`` is off, the entry's own content or summary is. Feeds are parsed by element local
names, so namespaced variants (``content:encoded``, ``dc:creator``) need no special cases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from xml.etree import ElementTree

from lmforge.collection.fetch import Fetcher, FetchError
from lmforge.collection.html import visible_text
from lmforge.collection.parallel import bounded_map
from lmforge.collection.types import Fingerprint, SourceContext, Unit, make_document
from lmforge.collection.urls import normalize_url
from lmforge.collection.web import fetch_unit, without_credentials
from lmforge.config.data import FeedSource
from lmforge.core.errors import DataError

FEED_TYPES = ("application/rss+xml", "application/atom+xml", "application/rdf+xml", "application/xml",
              "text/xml", "application/feed+json")
_ARTICLE_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


@dataclass(frozen=True)
class Entry:
    title: str
    link: str
    entry_id: str
    published: str
    author: str
    content: str  # HTML or text of the entry itself


def _local(tag: object) -> str:
    return str(tag).rsplit("}", 1)[-1].lower()


def parse_feed(data: bytes) -> list[Entry]:
    """Entries of an RSS or Atom document, in feed order."""
    root = ElementTree.fromstring(data)
    entries = []
    for node in root.iter():
        if _local(node.tag) not in ("item", "entry"):
            continue
        fields: dict[str, str] = {}
        for child in node:
            name = _local(child.tag)
            if name == "link" and child.get("href") and child.get("rel", "alternate") == "alternate":
                fields.setdefault("link", child.get("href", ""))
            elif name == "author" and len(child):
                fields.setdefault("author", "".join(child.itertext()).strip())
            elif child.text and child.text.strip():
                fields.setdefault(name, child.text.strip())
        content = fields.get("encoded") or fields.get("content") or fields.get("description") or fields.get("summary", "")
        entries.append(Entry(fields.get("title", ""), fields.get("link", ""), fields.get("guid") or fields.get("id", ""),
                             fields.get("pubdate") or fields.get("published") or fields.get("updated") or fields.get("date", ""),
                             fields.get("author") or fields.get("creator", ""), content))
    return entries


class Feeds:
    def __init__(self, cfg: FeedSource) -> None:
        self.cfg = cfg

    def units(self, ctx: SourceContext) -> Iterator[Unit]:
        fetcher = Fetcher(self.cfg.fetch, self.cfg.allow_private, self.cfg.allow_networks)
        failed = expected = 0
        with ThreadPoolExecutor(max_workers=self.cfg.fetch.concurrency, thread_name_prefix="feed") as pool:
            feed_urls = without_credentials(self.cfg.urls, ctx)
            failed += len(self.cfg.urls) - len(feed_urls)
            for feed_url in feed_urls:
                entries = self._entries(fetcher, feed_url, ctx)
                if entries is None:
                    failed += 1
                    continue
                expected += len(entries)
                ctx.expect(expected)
                yield from bounded_map(pool, lambda e: self._entry_unit(fetcher, feed_url, e, ctx), entries,  # noqa: B023 - consumed in this iteration
                                       2 * self.cfg.fetch.concurrency)
        if failed == len(self.cfg.urls):
            raise DataError(f"no feed of the source could be read ({dict(ctx.tally.skipped)})",
                            "check the feed URLs; skipped_examples in the summary name each refusal")

    def _entries(self, fetcher: Fetcher, feed_url: str, ctx: SourceContext) -> list[Entry] | None:
        try:
            response = fetcher.get(feed_url, accept=FEED_TYPES)
            return parse_feed(response.body)[: self.cfg.max_entries]
        except FetchError as exc:
            ctx.tally.skip(f"feed_{exc.reason}", feed_url, exc.detail)
        except ElementTree.ParseError as exc:
            ctx.tally.skip("feed_unreadable", feed_url, f"not RSS or Atom XML: {exc}")
        return None

    def _entry_unit(self, fetcher: Fetcher, feed_url: str, entry: Entry, ctx: SourceContext) -> Unit:
        link = normalize_url(entry.link, feed_url) if entry.link else None
        meta = {"feed": feed_url, "entry_id": entry.entry_id, "published": entry.published, "author": entry.author}
        if link and self.cfg.follow_links:
            page = fetch_unit(fetcher, link, ctx, _ARTICLE_TYPES, "feed", meta)
            if page is not None and (page.unit.docs is None or page.unit.docs):
                return page.unit
        uri = link or f"{feed_url}#{entry.entry_id or hashlib.sha256(entry.title.encode()).hexdigest()[:16]}"
        title, text = visible_text(entry.content) if "<" in entry.content else ("", entry.content)
        body = "\n\n".join(part for part in (entry.title, text) if part)
        digest = hashlib.sha256(body.encode()).hexdigest()
        prior = ctx.known(uri)
        if prior is not None and prior.fingerprint.hash == digest:
            return Unit(uri, prior.fingerprint, None)
        docs = [make_document(body, source="feed", uri=uri, title=entry.title or title,
                              content_type="application/rss+xml", meta=meta)] if text.strip() else []
        return Unit(uri, Fingerprint(digest), docs)
