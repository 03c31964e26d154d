"""The storage layer against a real S3-compatible server (moto on loopback, real HTTP, found through
AWS_ENDPOINT_URL as a user's MinIO would be): files, committed directories, a crash mid-write,
Parquet, the read cache, and the errors of a missing bucket and of refused credentials."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from conftest import BIN, free_port, server_process
from fixtures.collect.s3 import SECRET, client, s3_server

from lmforge.core.storage import MARKER, StorageError, check, open_store
from lmforge.core.workspace import Workspace

BUCKET = "lmforge-workspace"


@pytest.fixture(scope="module")
def s3():
    saved = os.environ.get("AWS_ENDPOINT_URL")
    with s3_server() as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        s3c = client(endpoint)
        s3c.create_bucket(Bucket=BUCKET)
        try:
            yield s3c
        finally:
            if saved is None:
                os.environ.pop("AWS_ENDPOINT_URL", None)
            else:
                os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _keys(s3c, prefix: str) -> list[str]:
    """The objects under ``prefix``, without the empty ``dir/`` markers pyarrow keeps for parents."""
    listed = s3c.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []) if not item["Key"].endswith("/"))


def test_files_directories_and_parquet_on_s3(s3, cache, request):
    prefix = f"ws-{request.node.name[:20]}"
    ws = Workspace.from_env(f"s3://{BUCKET}/{prefix}")
    store = check(ws)  # the preflight writes, reads and deletes a probe: nothing of it stays
    assert _keys(s3, prefix) == []

    store.atomic_write_json(ws.state_dir / "train.json", {"run": "r1"})
    table = pa.table({"id": list(range(5)), "text": [f"doc {i}" for i in range(5)]})
    store.write_table(ws.raw_dir / "part-0.parquet", table)
    with store.atomic_dir(ws.runs_dir / "r1" / "model") as tmp:
        (tmp / "config.json").write_text('{"layers": 2}')
        (tmp / "model.safetensors").write_bytes(b"\1" * 4096)
    assert _keys(s3, prefix) == [f"{prefix}/data/raw/part-0.parquet", f"{prefix}/runs/r1/model/{MARKER}",
                                 f"{prefix}/runs/r1/model/config.json", f"{prefix}/runs/r1/model/model.safetensors",
                                 f"{prefix}/state/train.json"]
    assert store.read_json("state/train.json") == {"run": "r1"}
    assert store.read_table("data/raw/part-0.parquet").equals(table)
    assert store.list_files("runs", recursive=True) == ["runs/r1/model/config.json", "runs/r1/model/model.safetensors"]
    assert store.uri("runs/r1") == f"s3://{BUCKET}/{prefix}/runs/r1"

    store.remove("runs/r1")
    assert store.list_files("runs", recursive=True) == [] and not store.is_committed("runs/r1/model")
    assert not any(k.startswith(f"{prefix}/runs/r1/model/") for k in _keys(s3, prefix))
    assert not ws.home.exists()  # nothing of the workspace was written on local disk


def test_a_crash_mid_write_leaves_nothing_visible(s3, cache, request):
    prefix = f"ws-{request.node.name[:20]}"
    store = open_store(f"s3://{BUCKET}/{prefix}")
    with store.atomic_dir("data/tokenized/d1") as tmp:
        (tmp / "shard-0.bin").write_bytes(b"old")

    with pytest.raises(RuntimeError), store.atomic_dir("data/tokenized/d1") as tmp:
        (tmp / "shard-0.bin").write_bytes(b"new, half written")
        raise RuntimeError("worker killed")
    with pytest.raises(RuntimeError), store.atomic_dir("data/tokenized/d2") as tmp:
        (tmp / "shard-0.bin").write_bytes(b"never committed")
        raise RuntimeError("worker killed")
    with pytest.raises(TypeError):
        store.atomic_write_bytes("state/eval.json", "a writer that fails after opening the object")  # type: ignore[arg-type] - the failure under test

    assert _keys(s3, prefix) == [f"{prefix}/data/tokenized/d1/{MARKER}", f"{prefix}/data/tokenized/d1/shard-0.bin"]
    assert store.read_bytes("data/tokenized/d1/shard-0.bin") == b"old"


def test_second_read_is_served_by_the_cache(s3, cache, request):
    url = f"s3://{BUCKET}/ws-{request.node.name[:20]}"
    with open_store(url).atomic_dir("data/tokenized/d1") as tmp:
        (tmp / "shard-0.bin").write_bytes(os.urandom(256 * 1024))
        (tmp / "meta.json").write_text("{}")

    cold = open_store(url)
    local = cold.cached_dir("data/tokenized/d1")
    assert (cold.stats.downloads, cold.stats.bytes_downloaded) == (2, 256 * 1024 + 2)

    warm = open_store(url)
    assert warm.cached_dir("data/tokenized/d1") == local
    assert (warm.stats.downloads, warm.stats.metadata, warm.stats.cache_hits) == (0, 1, 1)  # the manifest only
    assert (local / "shard-0.bin").stat().st_size == 256 * 1024


def test_a_missing_bucket_fails_the_preflight_and_a_later_write(s3, cache):
    with pytest.raises(StorageError) as caught:
        check("s3://no-such-bucket/ws")
    assert "'no-such-bucket' does not exist" in caught.value.cause and "LMFORGE_HOME=s3://no-such-bucket/ws" in caught.value.cause
    with pytest.raises(StorageError, match="does not exist"):
        open_store("s3://no-such-bucket/ws").atomic_write_text("state/x.json", "{}")


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A second moto server, a process of its own, that checks credentials (none are valid there)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with server_process(command, f"http://127.0.0.1:{port}/moto-api/", log, env=env, timeout=60):
        yield f"http://127.0.0.1:{port}"


def test_refused_credentials_fail_the_preflight_without_leaking_them(strict_s3, cache, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "lmforge-wrong-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(StorageError) as caught:
        check(f"s3://{BUCKET}/ws")
    assert "refused our credentials" in caught.value.cause and "LMFORGE_HOME" in caught.value.cause
    assert "AWS_ACCESS_KEY_ID" in caught.value.fix and SECRET not in str(caught.value)


def test_an_unreachable_endpoint_fails_the_preflight(cache, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "lmforge-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(StorageError, match="cannot be reached") as caught:
        check(f"s3://{BUCKET}/ws")
    assert "AWS_ENDPOINT_URL" in caught.value.fix


def test_concurrent_cold_readers_share_one_whole_cache_entry(s3, cache, request):
    from concurrent.futures import ThreadPoolExecutor

    url = f"s3://{BUCKET}/ws-{request.node.name[:20]}"
    with open_store(url).atomic_dir("models/base") as tmp:
        (tmp / "model.safetensors").write_bytes(os.urandom(300_000))
        (tmp / "config.json").write_text("{}")
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: open_store(url).cached_dir("models/base"), range(4)))
    assert len(set(paths)) == 1 and (paths[0] / "model.safetensors").stat().st_size == 300_000
    assert not list((cache / "tmp").iterdir())  # every download was renamed into place or removed
