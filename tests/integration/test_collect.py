"""Collect stage end to end: every source type at once, incremental re-runs, kill -9 and resume, CLI JSON.

Real things only: files on disk, an HTTP site on loopback, an S3-compatible server (moto), a
`datasets` dataset from local files, and `lmforge collect` run as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, REPO, run_cli
from fixtures.collect.corpus import EXPECTED, LONG, build_corpus, markers
from fixtures.collect.s3 import BUCKET, client, s3_server
from fixtures.collect.site import ARTICLE, Site, page

from lmforge.config.data import (
    DataConfig,
    FeedSource,
    FetchConfig,
    HFSource,
    InstructionConfig,
    LocalSource,
    S3Source,
    StdlibSource,
    WebSource,
)
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.data.stdlib_docs import build_instruction_pairs, iter_stdlib_docs
from lmforge.stages.collect import collect, raw_shard_paths, read_raw_documents

FAST = FetchConfig(requests_per_second=100, backoff_s=0.05, max_bytes=100_000, timeout_s=5)


@pytest.fixture(scope="module")
def stdlib_corpus() -> list[dict]:
    return list(iter_stdlib_docs([], 1_000_000))


def test_stdlib_corpus_is_large_documented_and_deterministic(stdlib_corpus):
    size = sum(len(d["text"].encode()) for d in stdlib_corpus)
    assert size >= 500_000
    assert list(iter_stdlib_docs([], 1_000_000)) == stdlib_corpus
    assert len({d["id"] for d in stdlib_corpus}) == len(stdlib_corpus)
    json_doc = next(d for d in stdlib_corpus if d["uri"] == "stdlib://json")
    assert "json.dumps(obj, *, skipkeys=False" in json_doc["text"]
    assert "Serialize ``obj`` to a JSON formatted ``str``" in json_doc["text"]
    assert json_doc["source"] == "stdlib" and json_doc["content_type"] == "text/x-python-docstring"
    assert not any(d["meta"]["module"].split(".")[0] in {"test", "idlelib", "tkinter", "antigravity"}
                   for d in stdlib_corpus)


def test_stdlib_modules_and_byte_budget_are_respected():
    docs = list(iter_stdlib_docs(["json"], 1_000_000))
    assert docs and {d["meta"]["module"].split(".")[0] for d in docs} == {"json"}
    assert len(list(iter_stdlib_docs(["json"], 1))) == 1  # stops once the budget is reached
    with pytest.raises(DataError, match="not_a_module"):
        list(iter_stdlib_docs(["not_a_module"], 1000))


def test_instruction_pairs_describe_known_functions():
    pairs = build_instruction_pairs(2000)
    assert len(pairs) == 2000
    assert pairs == build_instruction_pairs(2000)
    by_instruction = {p["instruction"]: p["response"] for p in pairs}
    assert len(by_instruction) == len(pairs)
    assert by_instruction["What does `json.dumps` do?"] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert all(10 < len(p["response"]) <= 200 and len(p["id"]) == 64 for p in pairs)


def _local_dir(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nThe alpha document talks about parsing text files.\n")
    (docs / "b.txt").write_text("The beta document is plain text about tokenizers.\n")
    (docs / "c.jsonl").write_text(json.dumps({"text": "Gamma record one.", "title": "g1"}) + "\n"
                                  + json.dumps({"text": "Gamma record two."}) + "\n")
    return docs


def test_collect_writes_shards_manifest_sft_and_is_incremental(tmp_path):
    ws = Workspace(tmp_path / "home")
    docs = _local_dir(tmp_path)
    cfg = DataConfig(sources=[StdlibSource(modules=["json"], max_bytes=20_000), LocalSource(paths=[str(docs)])],
                     instructions=InstructionConfig(max_records=50, test_fraction=0.2))
    seen = []
    first = collect(cfg, ws, progress=lambda name, done, total: seen.append((name, done, total)))

    assert seen == [("stdlib[0]", 1, 2), ("local[1]", 2, 2)]
    assert first.errors == []
    assert (first.per_source["local[1]"]["documents"], first.per_source["local[1]"]["new"]) == (4, 4)
    assert first.documents_new == first.documents_total > 4
    tables = [pq.read_table(p) for p in raw_shard_paths(ws)]
    assert tables[0].column_names == ["id", "text", "source", "uri", "title", "fetched_at", "content_type", "meta"]
    assert sum(t.num_rows for t in tables) == first.documents_total
    rows = read_raw_documents(ws)
    assert {r["source"] for r in rows} == {"stdlib", "local"} and "Alpha" in {r["title"] for r in rows}
    manifest = json.loads((ws.raw_dir / "manifest.json").read_text())
    assert manifest["digest"] == first.digest and manifest["documents_total"] == first.documents_total
    assert manifest["complete"] and manifest["sources_total"]["local[1]"]["documents"] == 4
    train = (ws.sft_dir / "train.jsonl").read_text().splitlines()
    test = (ws.sft_dir / "test.jsonl").read_text().splitlines()
    assert len(train) + len(test) == 50 and len(test) >= 1
    assert set(json.loads(train[0])) == {"id", "instruction", "response"}

    again = collect(cfg, ws)
    assert again.documents_new == 0 and again.digest == first.digest
    assert (ws.sft_dir / "train.jsonl").read_text().splitlines() == train

    (docs / "d.txt").write_text("A delta document arrives later.\n")
    third = collect(cfg, ws)
    assert third.documents_new == 1 and third.documents_total == first.documents_total + 1
    assert third.digest != first.digest


def test_failing_source_is_reported_while_others_finish(tmp_path):
    ws = Workspace(tmp_path / "home")
    cfg = DataConfig(sources=[LocalSource(paths=[str(tmp_path / "missing")]),
                              LocalSource(paths=[str(_local_dir(tmp_path))])],
                     instructions=InstructionConfig(source="none"))
    result = collect(cfg, ws)
    assert [e["source"] for e in result.errors] == ["local[0]"]
    assert "does not exist" in result.errors[0]["error"] and result.per_source["local[0]"]["error"]
    assert result.per_source["local[1]"]["new"] == 4 and result.documents_total == 4
    assert not (ws.sft_dir / "train.jsonl").exists()
    assert json.loads((ws.raw_dir / "manifest.json").read_text())["last_run"]["errors"] == result.errors


def test_empty_corpus_names_cause_and_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    cfg = DataConfig(sources=[LocalSource(paths=[str(tmp_path / "empty")]), LocalSource(paths=[str(bad)])])
    with pytest.raises(DataError) as info:
        collect(cfg, Workspace(tmp_path / "home"))
    assert "no documents were collected" in info.value.cause and "bad.jsonl#L1" in info.value.cause
    assert "data.sources" in info.value.fix
    assert not list((tmp_path / "home" / "data" / "raw").glob("*.parquet"))


# ---------------------------------------------------------------- every source type at once


@pytest.fixture(scope="module")
def site():
    server = Site().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        s3c = client(url)
        s3c.create_bucket(Bucket=BUCKET)
        s3c.put_object(Bucket=BUCKET, Key="in/s3-doc.txt", Body=("DOC-s3 an object in a bucket." + LONG).encode())
        yield url


def test_every_source_type_collects_exactly_the_expected_documents(site, endpoint, tmp_path):
    corpus = build_corpus(tmp_path / "corpus")
    hf_file = tmp_path / "hf.jsonl"
    hf_file.write_text(json.dumps({"text": "DOC-hf a dataset record." + LONG}) + "\n")
    loopback = ["127.0.0.0/8"]
    cfg = DataConfig(sources=[
        StdlibSource(modules=["json"], max_bytes=5_000),
        LocalSource(paths=[str(corpus)]),
        WebSource(seeds=[site.url("/")], sitemaps=[site.url("/sitemap.xml")], allow_networks=loopback, fetch=FAST,
                  max_depth=3),
        FeedSource(urls=[site.url("/feed.xml"), site.url("/atom.xml")], allow_networks=loopback, fetch=FAST),
        S3Source(bucket=BUCKET, prefix="in/", endpoint_url=endpoint),
        HFSource(dataset="json", data_files=[str(hf_file)]),
    ], instructions=InstructionConfig(source="none"), progress_interval_s=0)
    ws = Workspace(tmp_path / "home")
    first = collect(cfg, ws)
    docs = read_raw_documents(ws)

    assert first.errors == []
    by_source: dict[str, list[dict]] = {}
    for doc in docs:
        by_source.setdefault(doc["source"], []).append(doc)
    stdlib_uris = {d["uri"] for d in iter_stdlib_docs(["json"], 5_000)}
    assert {d["uri"] for d in by_source["stdlib"]} == stdlib_uris
    assert markers([d["text"] for d in by_source["local"]]) == EXPECTED
    web_paths = {d["uri"].replace(site.url("/"), "/") for d in by_source["web"]}
    assert web_paths == {"/", "/a", "/b", "/c", "/deep", "/target", "/flaky", "/notes.txt", "/only-in-sitemap"}
    assert {d["uri"].rsplit("/", 1)[-1] for d in by_source["feed"]} == {"1", "2", "3", "gone"}
    assert markers([d["text"] for d in by_source["s3"]]) == {"DOC-s3"}
    assert markers([d["text"] for d in by_source["hf"]]) == {"DOC-hf"}
    assert len(docs) == first.documents_total == first.documents_new
    assert {label: stats["new"] for label, stats in first.per_source.items()} == {
        "stdlib[0]": len(stdlib_uris), "local[1]": len(EXPECTED), "web[2]": 9, "feed[3]": 4, "s3[4]": 1, "hf[5]": 1}

    again = collect(cfg, ws)
    assert (again.documents_new, again.documents_total, again.digest) == (0, first.documents_total, first.digest)

    (corpus / "plain.txt").write_text("DOC-txt plain text, changed." + LONG)
    changed = collect(cfg, ws)
    assert (changed.documents_new, changed.documents_total) == (1, first.documents_total)
    assert {k: v["new"] for k, v in changed.per_source.items() if v["new"]} == {"local[1]": 1}


# ---------------------------------------------------------------- the CLI, kill -9 and resume


def _slow_site() -> Site:
    """A site whose home links to 24 pages, served slowly, so a crawl can be killed in the middle."""
    site = Site(delay_s=0.03)
    site.start()
    html = {"Content-Type": "text/html"}
    links = [f"/gen/{i}" for i in range(24)]
    site.routes["/"] = (200, html, page("Index", ARTICLE.format(name="index"), links).encode())
    for i, link in enumerate(links):
        site.routes[link] = (200, html, page(f"Generated {i}", ARTICLE.format(name=f"generated {i}")).encode())
    return site


def test_cli_json_and_kill_9_then_rerun_equals_a_clean_run(tmp_path):
    site = _slow_site()
    try:
        web = {"type": "web", "seeds": [site.url("/")], "allow_private": True, "max_depth": 1,
               "fetch": {"requests_per_second": 25, "concurrency": 2, "concurrency_per_host": 2}}
        config = tmp_path / "collect.yaml"
        config.write_text(yaml.safe_dump({"data": {"sources": [web], "instructions": {"source": "none"},
                                                   "shard_max_documents": 2}}))
        home = tmp_path / "killed"
        manifest = home / "data" / "raw" / "manifest.json"
        proc = subprocess.Popen([str(BIN / "lmforge"), "collect", str(config), "--json"], cwd=REPO,
                                env=dict(os.environ, LMFORGE_HOME=str(home)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted = json.loads(manifest.read_text())
        assert not interrupted["complete"] and 0 < interrupted["documents_total"] < 25
        with pytest.raises(DataError, match="did not finish"):  # curate refuses a half-collected corpus
            raw_shard_paths(Workspace(home))

        resumed = run_cli(["collect", str(config), "--json"], home)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        summary = json.loads(resumed.stdout.strip().splitlines()[-1])
        assert {"documents_total", "documents_new", "bytes", "per_source", "errors", "digest"} <= set(summary)
        assert summary["documents_total"] == 25 and summary["errors"] == []
        assert summary["documents_new"] == 25 - interrupted["documents_total"]
        assert summary["per_source"]["web[0]"]["documents"] == 25

        clean = collect(DataConfig.model_validate(yaml.safe_load(config.read_text())["data"]),
                        Workspace(tmp_path / "clean"))
        assert summary["digest"] == clean.digest
        ids = [i for p in raw_shard_paths(Workspace(home)) for i in pq.read_table(p).column("id").to_pylist()]
        assert len(ids) == len(set(ids)) == 25  # nothing doubled, nothing lost, no stray shard
        leftovers = [p.name for p in (home / "data" / "raw").iterdir()
                     if p.name.startswith(".") and p.name != ".collect.lock"]
        assert leftovers == []
    finally:
        site.stop()


def test_readme_example_config_is_valid():
    from lmforge.config.loader import parse_config

    readme = (REPO / "README.md").read_text()
    block = readme.split("## Collecting data", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(yaml.safe_load(block), "README.md")
    assert [s.type for s in config.data.sources] == ["stdlib", "local", "web", "feed", "s3", "hf"]


def test_an_interrupted_run_stops_every_source_promptly_and_keeps_the_last_commit(tmp_path):
    site = _slow_site()
    try:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a.txt").write_text("A local document that finishes first." + LONG)
        slow = WebSource(seeds=[site.url("/")], allow_private=True, max_depth=1,
                         fetch=FetchConfig(requests_per_second=5, concurrency=1, concurrency_per_host=1))
        cfg = DataConfig(sources=[LocalSource(paths=[str(tmp_path / "in")]), slow], shard_max_documents=1,
                         instructions=InstructionConfig(source="none"), progress_interval_s=0)

        def interrupt(label: str, done: int, total: int) -> None:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            collect(cfg, Workspace(tmp_path / "home"), progress=interrupt)
        assert time.monotonic() - started < 4  # the 25-page crawl at 5 pages/s was not waited for
        manifest = json.loads((tmp_path / "home" / "data" / "raw" / "manifest.json").read_text())
        assert not manifest["complete"] and manifest["documents_total"] >= 1
    finally:
        site.stop()
