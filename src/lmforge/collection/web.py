"""The ``web`` source: a polite crawler from seed URLs and sitemaps.

The crawl is breadth-first by depth level; the pages of one level are fetched concurrently (the
fetcher paces each host) and their results are taken in a fixed order, so the same site gives the
same crawl whatever the timing. Limits: ``max_pages`` requests, ``max_depth`` link hops, the
fetcher's bytes per page; links stay on the seeds' sites unless ``same_site`` is off. URLs are
deduplicated in normal form (:mod:`urls`), and pages by their ``<link rel=canonical>``. A page seen
before is asked for with its ETag/Last-Modified; a 304 or an unchanged body keeps its documents,
and its recorded links keep the crawl going without parsing it again. A seed or sitemap URL with a
user name or password is dropped and counted (``credentials_in_url``), never fetched or recorded
with them (:func:`lmforge.collection.urls.redact_urls`).
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from xml.etree import ElementTree

from lmforge.collection.archives import TooLarge, read_bounded
from lmforge.collection.fetch import Fetcher, FetchError, Response
from lmforge.collection.html import main_text, parse_page
from lmforge.collection.parallel import bounded_map
from lmforge.collection.textdecode import decode_text
from lmforge.collection.types import Fingerprint, SourceContext, Unit, make_document
from lmforge.collection.urls import has_credentials, normalize_url, site_of
from lmforge.config.data import WebSource
from lmforge.core.errors import DataError

_SITEMAP_TYPES = ("application/xml", "text/xml", "application/gzip", "application/x-gzip", "text/plain")
_HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class Page:
    unit: Unit
    links: list[str] = field(default_factory=list)
    canonical: str = ""


def response_text(response: Response, ctx: SourceContext) -> str | None:
    """The body as text: the declared charset when it decodes cleanly, else our decoder."""
    if response.charset:
        try:
            return response.body.decode(response.charset)
        except (LookupError, UnicodeDecodeError):
            pass
    return decode_text(response.body, ctx.tally, response.url)


def page_document(response: Response, url: str, ctx: SourceContext, source: str,
                  meta: dict | None = None) -> tuple[list[dict], list[str], str]:
    """(documents, links, canonical URL) of a fetched page; links are absolute and normalized."""
    text = response_text(response, ctx)
    if text is None:
        return [], [], url
    canonical = normalize_url(response.url) or url
    links: list[str] = []
    title = response.url.rstrip("/").rsplit("/", 1)[-1]
    if response.media_type in _HTML_TYPES or (not response.media_type and "<html" in text[:2000].lower()):
        info = parse_page(text)
        base = normalize_url(info.base, response.url) if info.base else response.url
        if not info.nofollow:
            links = [u for u in (normalize_url(href, base) for href in info.links) if u]
        if info.canonical:
            canonical = normalize_url(info.canonical, response.url) or canonical
        if info.noindex:
            ctx.tally.skip("noindex", url, "robots meta tag says noindex")
            return [], links, canonical
        title, text = main_text(text, response.url, info)
    if not text.strip():
        ctx.tally.skip("empty", url, "no main text")
        return [], links, canonical
    details = {"url": url, "final_url": response.url, "status": response.status, **(meta or {})}
    for key in ("etag", "last-modified"):
        if key in response.headers:
            details[key.replace("-", "_")] = response.headers[key]
    doc = make_document(text, source=source, uri=canonical, title=title, content_type=response.media_type or "text/html",
                        meta=details)
    return [doc], links, canonical


def fetch_unit(fetcher: Fetcher, url: str, ctx: SourceContext, accept: tuple[str, ...], source: str,
               meta: dict | None = None) -> Page | None:
    """Fetch one page as a unit (conditional when it was seen before); None when refused (counted)."""
    prior = ctx.known(url)
    old = prior.fingerprint if prior else Fingerprint()
    try:
        response = fetcher.get(url, accept=accept, etag=old.etag, last_modified=old.last_modified)
    except FetchError as exc:
        ctx.tally.skip(exc.reason, url, exc.detail)
        return None
    if response.not_modified and prior is not None:
        return Page(Unit(url, old, None, list(prior.links)), list(prior.links), prior.canonical or url)
    fingerprint = Fingerprint(hashlib.sha256(response.body).hexdigest(), response.headers.get("etag"),
                              response.headers.get("last-modified"))
    if prior is not None and prior.fingerprint.hash == fingerprint.hash:
        return Page(Unit(url, fingerprint, None, list(prior.links)), list(prior.links), prior.canonical or url)
    docs, links, canonical = page_document(response, url, ctx, source, meta)
    return Page(Unit(url, fingerprint, docs, links, canonical), links, canonical)


def without_credentials(urls: list[str], ctx: SourceContext) -> list[str]:
    """``urls`` less those naming a user or password, each counted as ``credentials_in_url``.

    Such a URL is dropped, not fetched without its credentials: the page behind it needs them, and
    fetching it anyway would only record a refusal. The skip names the URL with ``***`` for them.
    """
    kept = []
    for url in urls:
        if has_credentials(url):
            ctx.tally.skip("credentials_in_url", url, "URLs with a user name or password are not fetched, so that "
                           "no credential is sent or recorded; crawl pages that need no login")
        else:
            kept.append(url)
    return kept


def interleave_hosts(urls: list[str]) -> list[str]:
    """Round-robin over hosts, so pool threads waiting for one host's pace never starve the others."""
    queues: dict[str, list[str]] = {}
    for url in urls:
        queues.setdefault(urlsplit(url).netloc, []).append(url)
    ordered: list[str] = []
    for turn in range(max((len(q) for q in queues.values()), default=0)):
        ordered.extend(q[turn] for q in queues.values() if turn < len(q))
    return ordered


class WebCrawl:
    def __init__(self, cfg: WebSource) -> None:
        self.cfg = cfg
        self.sites = {site_of(u) for u in [*cfg.seeds, *cfg.sitemaps]}

    def units(self, ctx: SourceContext) -> Iterator[Unit]:
        cfg = self.cfg
        fetcher = Fetcher(cfg.fetch, cfg.allow_private, cfg.allow_networks)
        ctx.expect(cfg.max_pages)
        level = [u for u in (normalize_url(s) for s in without_credentials(cfg.seeds, ctx)) if u]
        for sitemap in without_credentials(cfg.sitemaps, ctx):
            level.extend(self._sitemap_urls(fetcher, sitemap, ctx, 0))
        visited: set[str] = set()
        canonicals: set[str] = set()
        requested = fetched = 0
        with ThreadPoolExecutor(max_workers=cfg.fetch.concurrency, thread_name_prefix="crawl") as pool:
            for depth in range(cfg.max_depth + 1):
                batch = self._next_batch(level, visited, cfg.max_pages - requested)
                requested += len(batch)
                # Crawl order within a level: round-robin over hosts (a pure function of the level,
                # so reproducible); results are taken in that order whatever the timing.
                pages = bounded_map(pool, lambda url: fetch_unit(fetcher, url, ctx, tuple(cfg.content_types), "web",
                                                                 {"depth": depth}),  # noqa: B023 - consumed in this iteration
                                    interleave_hosts(batch), 2 * cfg.fetch.concurrency)
                level = []
                for page in pages:
                    if page is None:
                        continue
                    fetched += 1
                    visited.add(page.canonical)
                    if page.canonical in canonicals and page.unit.docs:
                        ctx.tally.skip("duplicate_canonical", page.unit.uri, f"same page as {page.canonical}")
                        page.unit.docs = []
                    canonicals.add(page.canonical)
                    yield page.unit
                    level.extend(page.links)
                if not level or requested >= cfg.max_pages:
                    break
        if requested and not fetched:
            raise DataError(f"no page of the web source could be fetched ({dict(ctx.tally.skipped)})",
                            "check the seeds/sitemaps are reachable and allowed (robots.txt, allow_private); "
                            "skipped_examples in the summary name each refusal")

    def _next_batch(self, level: list[str], visited: set[str], room: int) -> list[str]:
        batch: list[str] = []
        for url in level:
            if len(batch) >= room:
                break
            if url in visited or (self.cfg.same_site and site_of(url) not in self.sites):
                continue
            if any(fnmatch.fnmatch(url, pattern) for pattern in self.cfg.exclude):
                continue
            visited.add(url)
            batch.append(url)
        return batch

    def _sitemap_urls(self, fetcher: Fetcher, url: str, ctx: SourceContext, depth: int) -> list[str]:
        """Page URLs of a sitemap or sitemap index (nested at most two deep; gzip allowed)."""
        try:
            response = fetcher.get(url, accept=_SITEMAP_TYPES)
            body = response.body
            if body[:2] == b"\x1f\x8b":
                body = read_bounded(gzip.GzipFile(fileobj=io.BytesIO(body), mode="rb"), fetcher.cfg.max_bytes)
            root = ElementTree.fromstring(body)
        except FetchError as exc:
            ctx.tally.skip(f"sitemap_{exc.reason}", url, exc.detail)
            return []
        except (ElementTree.ParseError, TooLarge, OSError, EOFError) as exc:
            ctx.tally.skip("sitemap_unreadable", url, f"{type(exc).__name__}: {exc}")
            return []
        locs = [(node.text or "").strip() for node in root.iter() if node.tag.rsplit("}", 1)[-1] == "loc"]
        if root.tag.rsplit("}", 1)[-1] == "sitemapindex":
            if depth >= 2:
                return []
            return [u for loc in locs for u in self._sitemap_urls(fetcher, loc, ctx, depth + 1)]
        return [u for u in (normalize_url(loc) for loc in locs) if u]
