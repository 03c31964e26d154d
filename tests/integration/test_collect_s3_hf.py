"""The s3 source against a real S3-compatible server (moto, on loopback) and the hf source on local data."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import pytest
from fixtures.collect.corpus import LONG
from fixtures.collect.s3 import BUCKET, SECRET, client, s3_server

from lmforge.config.data import DataConfig, HFSource, InstructionConfig, LocalSource, S3Source
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.stages.collect import collect, read_raw_documents


def _config(*sources) -> DataConfig:
    return DataConfig(sources=list(sources), instructions=InstructionConfig(source="none"), progress_interval_s=0)


def _zip_with_traversal() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("inner.txt", "S3-zip member text." + LONG)
        archive.writestr(zipfile.ZipInfo("../../escape.txt"), "never read")
    return out.getvalue()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        s3c = client(endpoint)
        s3c.create_bucket(Bucket=BUCKET)
        objects = {
            "texts/a.txt": ("S3-a plain object." + LONG).encode(),
            "texts/b.md": ("# B\n\nS3-b markdown object." + LONG).encode(),
            "texts/records.jsonl.gz": gzip.compress("".join(
                json.dumps({"text": f"S3-record-{i} from a gzipped JSONL object." + LONG}) + "\n"
                for i in range(3)).encode()),
            "texts/bundle.zip": _zip_with_traversal(),
            "texts/skip.bin": b"\x00\x01",
            "other/outside-prefix.txt": b"S3-outside must not be listed",
        }
        for key, body in objects.items():
            s3c.put_object(Bucket=BUCKET, Key=key, Body=body)
        yield endpoint, s3c


def test_s3_prefix_is_collected_incrementally_without_leaking_credentials(s3, tmp_path):
    endpoint, s3c = s3
    ws = Workspace(tmp_path / "home")
    source = S3Source(bucket=BUCKET, prefix="texts/", endpoint_url=endpoint)
    first = collect(_config(source), ws)
    docs = read_raw_documents(ws)
    assert sorted(d["uri"].split(f"s3://{BUCKET}/", 1)[1] for d in docs) == [
        "texts/a.txt", "texts/b.md", "texts/bundle.zip!/inner.txt",
        "texts/records.jsonl.gz#L1", "texts/records.jsonl.gz#L2", "texts/records.jsonl.gz#L3"]
    assert {d["source"] for d in docs} == {"s3"}
    stats = first.per_source["s3[0]"]
    assert stats["skipped"] == {"unsafe_archive_member": 1, "unsupported_format": 1} and stats["units"] == 4

    again = collect(_config(source), ws)
    assert again.documents_new == 0 and again.per_source["s3[0]"]["unchanged"] == 4  # ETags matched: no download
    s3c.put_object(Bucket=BUCKET, Key="texts/a.txt", Body=("S3-a plain object, revised." + LONG).encode())
    changed = collect(_config(source), ws)
    assert (changed.documents_new, changed.documents_total) == (1, first.documents_total)

    for path in ws.home.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_missing_bucket_is_a_source_error_while_other_sources_finish(s3, tmp_path):
    endpoint, _ = s3
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("A local document next to a broken bucket." + LONG)
    result = collect(_config(S3Source(bucket="no-such-bucket", endpoint_url=endpoint),
                             LocalSource(paths=[str(tmp_path / "in")])),
                     Workspace(tmp_path / "home"))
    assert [e["source"] for e in result.errors] == ["s3[0]"]
    assert "no-such-bucket does not exist" in result.errors[0]["error"] and result.errors[0]["fix"]
    assert result.per_source["local[1]"]["new"] == 1 and SECRET not in json.dumps(result.as_dict())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps({"content": f"HF record {i}." + LONG, "label": i % 2, "title": f"t{i}"}) + "\n"
                            for i in range(7)))
    return path


def test_hf_dataset_from_local_files_in_chunks(records, tmp_path):
    ws = Workspace(tmp_path / "home")
    source = HFSource(dataset="json", data_files=[str(records)], text_field="content", title_field="title",
                      meta_fields=["label"], chunk_rows=3)
    first = collect(_config(source), ws)
    docs = read_raw_documents(ws)
    assert first.documents_total == 7 and first.per_source["hf[0]"]["units"] == 3  # 3 + 3 + 1 rows
    assert {d["source"] for d in docs} == {"hf"} and {d["title"] for d in docs} == {f"t{i}" for i in range(7)}
    assert json.loads(docs[0]["meta"]) in ({"label": 0}, {"label": 1})
    assert (ws.home / "cache" / "collect" / "hf").is_dir()  # datasets' cache stays in the workspace
    assert collect(_config(source), ws).documents_new == 0

    streamed = collect(_config(source.model_copy(update={"streaming": True, "max_records": 4})),
                       Workspace(tmp_path / "s"))
    assert streamed.documents_total == 4


def test_hf_saved_dataset_directory_and_errors(records, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    dataset = datasets.load_dataset("json", data_files=[str(records)], split="train", cache_dir=str(tmp_path / "c"))
    dataset.save_to_disk(str(saved))
    result = collect(_config(HFSource(dataset=str(saved), text_field="content")), Workspace(tmp_path / "home"))
    assert result.documents_total == 7

    with pytest.raises(DataError) as info:
        collect(_config(HFSource(dataset="someorg/not-downloaded")), Workspace(tmp_path / "hub"))
    assert "not reachable" in info.value.cause and "HF_HUB_OFFLINE" in info.value.fix
    with pytest.raises(DataError) as info:
        collect(_config(HFSource(dataset=str(saved), text_field="body")), Workspace(tmp_path / "col"))
    assert "no column 'body'" in info.value.cause
