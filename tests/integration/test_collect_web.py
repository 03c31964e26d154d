"""The web and feed sources against a real HTTP server on loopback (tests/fixtures/collect/site.py)."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
from fixtures.collect.site import ARTICLE, Site, page

from lmforge.collection.fetch import Fetcher, FetchError
from lmforge.collection.netguard import networks, refusal
from lmforge.config.data import DataConfig, FeedSource, FetchConfig, InstructionConfig, WebSource
from lmforge.core.workspace import Workspace
from lmforge.stages.collect import collect, read_raw_documents

LOOPBACK = ["127.0.0.0/8"]
FAST = FetchConfig(requests_per_second=100, backoff_s=0.05, retries=2, max_bytes=100_000, timeout_s=5)


@pytest.fixture
def site():
    server = Site().start()
    yield server
    server.stop()


def _config(*sources) -> DataConfig:
    return DataConfig(sources=list(sources), instructions=InstructionConfig(source="none"), progress_interval_s=0)


def _paths(docs: list[dict], site: Site) -> set[str]:
    return {d["uri"].replace(site.url(""), "/").replace("//", "/") for d in docs}


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "fd00:ec2::254",
                                     "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "100.64.0.1", "0.0.0.0",
                                     "224.0.0.1"])
def test_non_public_addresses_are_refused_unless_allowed(address):
    ip = ipaddress.ip_address(address)
    assert refusal(ip, allow_private=False, allowed=[]) is not None
    assert refusal(ip, allow_private=True, allowed=[]) is None
    assert refusal(ipaddress.ip_address("93.184.216.34"), allow_private=False, allowed=[]) is None
    assert refusal(ipaddress.ip_address("::ffff:127.0.0.1"), False, networks(["127.0.0.0/8"])) is None


def test_loopback_is_refused_before_any_request_unless_allowed(site):
    with pytest.raises(FetchError) as info:
        Fetcher(FAST, allow_private=False, allow_networks=[]).get(site.url("/a"))
    assert info.value.reason == "private_address" and site.log == []
    response = Fetcher(FAST, allow_private=True, allow_networks=[]).get(site.url("/a"))
    assert response.status == 200 and b"Page A" in response.body


def test_private_redirects_are_refused_without_connecting(site):
    site.routes["/to-mapped"] = (302, {"Location": "http://[::ffff:169.254.169.254]/latest/"}, b"")
    site.routes["/to-other-loopback"] = (302, {"Location": site.url("/a").replace("127.0.0.1", "127.0.0.2")}, b"")
    fetcher = Fetcher(FAST, allow_private=False, allow_networks=["127.0.0.1/32"])
    for path, shown in (("/to-metadata", "169.254.169.254"), ("/to-mapped", "169.254.169.254"),
                        ("/to-other-loopback", "127.0.0.2")):
        started = time.monotonic()
        with pytest.raises(FetchError) as info:
            fetcher.get(site.url(path))
        assert info.value.reason == "private_address" and shown in info.value.detail
        assert time.monotonic() - started < 2  # refused, not a connect attempt timing out
    assert fetcher.get(site.url("/moved")).url == site.url("/target")  # redirects inside the allowed network work


def test_unreachable_hosts_and_undeclared_huge_bodies(site):
    from conftest import free_port

    fetcher = Fetcher(FAST, allow_private=False, allow_networks=LOOPBACK)
    with pytest.raises(FetchError) as info:
        fetcher.get(f"http://127.0.0.1:{free_port()}/")  # nothing listens there: retried, then given up
    assert info.value.reason == "unreachable"
    with pytest.raises(FetchError) as info:
        fetcher.get(site.url("/stream-huge"))
    assert info.value.reason == "too_large" and "sent more than" in info.value.detail


def test_crawl_collects_the_site_politely_and_reports_every_refusal(site, tmp_path):
    ws = Workspace(tmp_path / "home")
    web = WebSource(seeds=[site.url("/")], sitemaps=[site.url("/sitemap.xml")], allow_networks=LOOPBACK,
                    fetch=FAST, max_depth=3)
    result = collect(_config(web), ws)
    docs = read_raw_documents(ws)
    assert _paths(docs, site) == {"/", "/a", "/b", "/c", "/deep", "/target", "/flaky", "/notes.txt",
                                  "/only-in-sitemap"}
    stats = result.per_source["web[0]"]
    assert stats["skipped"] == {"content_type": 1, "http_404": 1, "noindex": 1, "private_address": 1,
                                "robots_disallow": 1, "too_large": 1}
    assert site.requested("/private/secret") == 0  # robots.txt said no: never asked
    assert site.requested("/flaky") == 2  # a 500, then the retry that worked
    assert site.requested("/robots.txt") == 1 and site.requested("/a") == 1  # dedup of /a, /a#section, sitemap
    assert not any("other.example" in p for p, _ in site.log)  # same-site
    home = next(d for d in docs if d["title"] == "Home")
    assert "main text of the home page" in home["text"] and "Copyright" not in home["text"]
    meta = json.loads(home["meta"])
    assert meta["status"] == 200 and meta["depth"] == 0 and meta["etag"]
    assert all(p[1].get("User-Agent") == FAST.user_agent for p in site.log)

    before = len(site.log)
    again = collect(_config(web), ws)
    assert again.documents_new == 0 and again.digest == result.digest
    conditional = [headers.get("If-None-Match") for path, headers in site.log[before:] if path == "/a"]
    assert conditional and conditional[0]  # asked with the ETag, answered 304

    site.routes["/deep"] = (200, {"Content-Type": "text/html"}, page("Deep", "Rewritten deep page." + ARTICLE).encode())
    changed = collect(_config(web), ws)
    assert (changed.documents_new, changed.documents_total) == (1, result.documents_total)


def test_limits_depth_pages_and_canonical(site, tmp_path):
    site.routes["/a"] = (200, {"Content-Type": "text/html"},
                         page("Page A", ARTICLE.format(name="A"), ["/c", "/copy"]).encode())
    site.routes["/copy"] = (200, {"Content-Type": "text/html"},
                            page("Copy", "A copy of A with a different footer." + ARTICLE,
                                 head='<link rel="canonical" href="/a">').encode())
    shallow = WebSource(seeds=[site.url("/a")], allow_networks=LOOPBACK, fetch=FAST, max_depth=1)
    result = collect(_config(shallow), Workspace(tmp_path / "one"))
    assert _paths(read_raw_documents(Workspace(tmp_path / "one")), site) == {"/a", "/c", "/"}  # "/": the nav link
    assert result.per_source["web[0]"]["skipped"] == {"duplicate_canonical": 1}
    assert site.requested("/deep") == 0  # depth 2 is past max_depth

    before = len(site.log)
    capped = WebSource(seeds=[site.url("/")], allow_networks=LOOPBACK, fetch=FAST, max_pages=3)
    collect(_config(capped), Workspace(tmp_path / "two"))
    fetched = [p for p, _ in site.log[before:] if p != "/robots.txt"]
    # The seed first; its links are fetched concurrently, so their order is not fixed.
    assert fetched[0] == "/" and sorted(fetched) == ["/", "/a", "/b"]


def test_per_host_rate_limit_spaces_requests(site, tmp_path):
    slow = FetchConfig(requests_per_second=10, concurrency=4, concurrency_per_host=2, max_bytes=100_000)
    web = WebSource(seeds=[site.url("/a"), site.url("/b"), site.url("/c"), site.url("/deep"), site.url("/target")],
                    allow_networks=LOOPBACK, fetch=slow, max_depth=0)
    started = time.monotonic()
    collect(_config(web), Workspace(tmp_path / "home"))
    # robots.txt + 5 pages at 10 requests/s: at least 5 intervals of 0.1 s between request starts
    assert time.monotonic() - started >= 0.5
    assert len(site.log) == 6


def test_robots_unreachable_means_crawl_nothing(site, tmp_path):
    from lmforge.core.errors import DataError

    site.routes["/robots.txt"] = (503, {"Content-Type": "text/plain"}, b"down")
    web = WebSource(seeds=[site.url("/a")], allow_networks=LOOPBACK,
                    fetch=FetchConfig(retries=0, max_bytes=100_000, requests_per_second=100))
    with pytest.raises(DataError) as info:
        collect(_config(web), Workspace(tmp_path / "home"))
    assert "web[0]: no page of the web source could be fetched ({'robots_unavailable': 1})" in info.value.cause
    assert site.requested("/a") == 0 and site.requested("/robots.txt") == 1


def test_feeds_follow_entry_links_and_fall_back_to_entry_content(site, tmp_path):
    ws = Workspace(tmp_path / "home")
    feed = FeedSource(urls=[site.url("/feed.xml"), site.url("/atom.xml")], allow_networks=LOOPBACK, fetch=FAST)
    result = collect(_config(feed), ws)
    docs = {d["uri"].rsplit("/", 1)[-1]: d for d in read_raw_documents(ws)}
    assert set(docs) == {"1", "2", "3", "gone"}
    assert "main text of the news story 1" in docs["1"]["text"]  # the article, not the feed summary
    assert json.loads(docs["1"]["meta"])["author"] == "Ada" and json.loads(docs["3"]["meta"])["author"] == "Grace"
    assert "full text of the gone story" in docs["gone"]["text"] and "<b>" not in docs["gone"]["text"]
    assert result.per_source["feed[0]"]["skipped"] == {"http_404": 1}
    assert {d["source"] for d in docs.values()} == {"feed"}
    assert collect(_config(feed), ws).documents_new == 0

    summaries = FeedSource(urls=[site.url("/feed.xml")], allow_networks=LOOPBACK, fetch=FAST, follow_links=False)
    collect(_config(summaries), Workspace(tmp_path / "summaries"))
    texts = [d["text"] for d in read_raw_documents(Workspace(tmp_path / "summaries"))]
    assert any("Short summary of the first story" in t for t in texts)


def test_a_page_reached_by_two_sources_is_one_document(site, tmp_path):
    ws = Workspace(tmp_path / "home")
    web = WebSource(seeds=[site.url("/news/1"), site.url("/news/2")], allow_networks=LOOPBACK, fetch=FAST,
                    max_depth=0)
    feed = FeedSource(urls=[site.url("/feed.xml")], allow_networks=LOOPBACK, fetch=FAST)
    cfg = DataConfig(sources=[web, feed], instructions=InstructionConfig(source="none"), progress_interval_s=0)
    first = collect(cfg, ws)
    assert first.documents_total == 3 and len(read_raw_documents(ws)) == 3  # news 1, 2 once each, and "gone"
    for _ in range(2):
        again = collect(cfg, ws)
        assert (again.documents_new, again.documents_total, again.digest) == (0, 3, first.digest)
