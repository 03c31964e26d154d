"""The storage layer on fsspec's in-memory filesystem (an object store without rename) and on a local
directory: atomic files, committed directories, Parquet, the read cache, and settings' errors."""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pytest

from lmforge.core.errors import ConfigError
from lmforge.core.storage import MARKER, StorageError, check, open_store, parse
from lmforge.core.storage.location import Location, storage_error
from lmforge.core.workspace import Workspace


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["memory", "local"])
def store(request, tmp_path, cache):
    where = f"memory://lmforge-{uuid.uuid4().hex[:8]}/ws" if request.param == "memory" else tmp_path / "home"
    return check(where)


def test_locations_parse_paths_and_urls(tmp_path):
    assert parse(tmp_path / "h") == Location("file", str(tmp_path / "h"), str(tmp_path / "h"))
    assert parse(f"file://{tmp_path}/h").root == str(tmp_path / "h")
    s3 = parse("s3://bucket/some/prefix/")
    assert (s3.scheme, s3.root, s3.bucket, s3.uri("a/b")) == ("s3", "bucket/some/prefix", "bucket",
                                                              "s3://bucket/some/prefix/a/b")
    assert parse("gcs://b/p").scheme == "gs" and parse("abfs://c/p").scheme == "az"
    assert parse("memory://x/y").root == "/x/y"


@pytest.mark.parametrize(("url", "words"), [
    ("nosuch://bucket/p", "unknown storage scheme 'nosuch://'"),
    ("s3:///prefix-without-bucket", "names no bucket"),
    ("s3://bucket/p?versionId=1", "query or fragment"),
    ("s3://key:very-secret@bucket/p", "holds credentials"),
])
def test_bad_locations_name_the_setting_and_the_fix(url, words):
    with pytest.raises(StorageError) as caught:
        parse(url)
    assert words in caught.value.cause and "LMFORGE_HOME" in str(caught.value) and caught.value.fix
    assert "very-secret" not in str(caught.value)


def test_workspace_from_a_url_keeps_only_its_local_side_in_the_cache(cache, monkeypatch):
    ws = Workspace.from_env("s3://bucket/team/")
    assert ws.is_remote and ws.url == "s3://bucket/team" and ws.location == "s3://bucket/team"
    assert ws.home.parent == cache.resolve() / "homes"
    assert Workspace.from_env("s3://bucket/other").home != ws.home
    assert not Workspace.from_env("relative/home").is_remote
    with pytest.raises(ConfigError, match="credentials"):
        Workspace.from_env("s3://AKIA:secret@bucket/p")


def test_files_are_written_whole_and_listed_without_temporaries(store):
    store.atomic_write_json("state/train.json", {"loss": 1.5})
    store.atomic_write_text("notes/a.txt", "first")
    store.atomic_write_text("notes/a.txt", "second")
    with pytest.raises(TypeError):
        store.atomic_write_bytes("notes/b.txt", "not bytes")  # type: ignore[arg-type] - a writer that fails midway
    assert store.read_json("state/train.json") == {"loss": 1.5} and store.read_text("notes/a.txt") == "second"
    assert store.list_files(recursive=True) == ["notes/a.txt", "state/train.json"]
    assert store.list_files("notes") == ["notes/a.txt"] and not store.exists("notes/b.txt")
    assert not [p for p in _all_paths(store) if ".tmp" in p]
    store.remove("notes")
    assert store.list_files(recursive=True) == ["state/train.json"]


def test_a_directory_is_visible_only_once_committed_and_is_replaced_whole(store):
    with store.atomic_dir("runs/r1/model") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "weights").mkdir()
        (tmp / "weights" / "part-0.bin").write_bytes(b"\0" * 100)
    assert store.is_committed("runs/r1/model")
    assert store.committed_files("runs/r1/model") == ["runs/r1/model/config.json", "runs/r1/model/weights/part-0.bin"]

    with pytest.raises(RuntimeError), store.atomic_dir("runs/r1/model") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-write")
    assert store.committed_files("runs/r1/model")[0] == "runs/r1/model/config.json"  # the old output stands

    with store.atomic_dir("runs/r1/model") as tmp:
        (tmp / "new.bin").write_bytes(b"y")
    assert store.committed_files("runs/r1/model") == ["runs/r1/model/new.bin"]  # nothing of the old one left
    assert store.list_files("runs/r1/model", recursive=True) == ["runs/r1/model/new.bin"]
    assert not [p for p in _all_paths(store) if ".tmp" in p]

    with pytest.raises(RuntimeError), store.atomic_dir("runs/r2/model") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("crash before the first commit")
    assert not store.is_committed("runs/r2/model") and store.list_files("runs/r2", recursive=True) == []
    with pytest.raises(FileNotFoundError):
        store.cached_dir("runs/r2/model")


def test_an_uncommitted_remote_directory_is_not_an_output(cache):
    store = open_store(f"memory://lmforge-{uuid.uuid4().hex[:8]}/ws")
    store.atomic_write_bytes("data/tokenized/abc/shard-0.parquet", b"orphan of a crash mid-publish")
    with pytest.raises(FileNotFoundError, match=MARKER):
        store.committed_files("data/tokenized/abc")


def test_parquet_round_trip_file_and_directory(store):
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    store.write_table("data/raw/part-0.parquet", table)
    assert store.read_table("data/raw/part-0.parquet").equals(table)
    with store.atomic_dir("data/curated") as tmp:
        import pyarrow.parquet as pq

        pq.write_table(table.slice(0, 2), tmp / "part-0.parquet")
        pq.write_table(table.slice(2), tmp / "part-1.parquet")
    assert store.read_table("data/curated", columns=["id"]).to_pydict() == {"id": [1, 2, 3]}


def test_cache_serves_a_committed_directory_without_downloading_again(cache):
    url = f"memory://lmforge-{uuid.uuid4().hex[:8]}/ws"
    writer = open_store(url)
    with writer.atomic_dir("data/tokenized/d1") as tmp:
        (tmp / "shard-0.bin").write_bytes(b"tokens" * 1000)
    first = open_store(url)
    path = first.cached_dir("data/tokenized/d1")
    assert (path / "shard-0.bin").read_bytes() == b"tokens" * 1000 and str(path).startswith(str(cache.resolve()))
    assert (first.stats.downloads, first.stats.cache_misses) == (1, 1)

    second = open_store(url)  # another process on this machine: same cache, no download
    assert second.cached_dir("data/tokenized/d1") == path
    assert (second.stats.downloads, second.stats.cache_hits, second.stats.metadata) == (0, 1, 1)

    digest = writer.manifest("data/tokenized/d1")["files"]["shard-0.bin"]["sha256"]
    third = open_store(url)
    third.cached_path("data/tokenized/d1/shard-0.bin", digest=digest)
    assert third.stats.as_dict() == {"metadata": 0, "downloads": 0, "bytes_downloaded": 0, "uploads": 0,
                                     "cache_hits": 1, "cache_misses": 0}  # a known digest: no request at all


def test_a_lone_object_is_cached_by_size_and_mtime(cache):
    store = open_store(f"memory://lmforge-{uuid.uuid4().hex[:8]}/ws")
    store.atomic_write_bytes("tokenizer/tokenizer.json", b'{"v": 1}')
    assert store.cached_path("tokenizer/tokenizer.json").read_bytes() == b'{"v": 1}'
    store.cached_path("tokenizer/tokenizer.json")
    assert (store.stats.downloads, store.stats.cache_hits) == (1, 1)


def test_workspace_paths_are_keys_and_local_stores_write_where_they_did(tmp_path, cache):
    ws = Workspace(tmp_path / "home")
    store = open_store(ws)
    store.atomic_write_json(ws.state_dir / "train.json", {"ok": True})
    assert json.loads((ws.state_dir / "train.json").read_text()) == {"ok": True}
    assert store.key(ws.tokenized_dir / "d1") == "data/tokenized/d1" and store.uri("runs") == str(ws.home / "runs")
    assert store.cached_path(ws.state_dir / "train.json") == ws.state_dir / "train.json"  # no copy of local data
    assert not cache.exists()
    with pytest.raises(ValueError, match="leaves the store's root"):
        store.key("../elsewhere")
    with pytest.raises(ValueError, match="not inside the workspace"):
        store.key(tmp_path / "elsewhere")


def test_store_refusals_become_errors_that_name_the_setting():
    loc = parse("s3://team-bucket/ws")
    missing = storage_error(OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation"), loc, "list runs")
    denied = storage_error(OSError("AWS Error ACCESS_DENIED during HeadBucket operation: No response body."),
                           loc, "look up the bucket")
    assert isinstance(missing, StorageError) and "'team-bucket' does not exist" in missing.cause
    assert isinstance(denied, StorageError) and "refused our credentials" in denied.cause
    assert all("LMFORGE_HOME=s3://team-bucket/ws" in e.cause and e.fix for e in (missing, denied))
    other = OSError("disk full")
    assert storage_error(other, loc, "write") is other  # not a settings problem: unchanged


def test_check_names_an_unwritable_local_home(tmp_path, cache):
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.raises(StorageError, match="LMFORGE_HOME"):
        check(tmp_path / "file" / "home")


def _all_paths(store) -> list[str]:
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.location.root, recursive=True, allow_not_found=True))
    return [info.path for info in infos]


def test_a_store_sent_to_a_worker_reopens_with_the_workers_cache(cache, monkeypatch, tmp_path):
    import pickle

    store = open_store(f"memory://lmforge-{uuid.uuid4().hex[:8]}/ws")
    store.atomic_write_text("state/x.json", "{}")
    payload = pickle.dumps(store)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "worker-cache"))
    there = pickle.loads(payload)
    assert there.location == store.location and there.read_text("state/x.json") == "{}"
    assert there.cache.root == (tmp_path / "worker-cache").resolve()
