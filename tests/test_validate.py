"""Validate stage: the real Great Expectations suite on curated files in a temporary workspace."""

from __future__ import annotations

import json

import pytest

from lmforge.collect import text_id, write_documents
from lmforge.config.stages import ValidationConfig
from lmforge.errors import DataError, ValidationFailed
from lmforge.validate import validate
from lmforge.workspace import Workspace


def _doc(text: str | None, doc_id: str | None = None, source: str = "local") -> dict:
    return {"id": doc_id or text_id(text or ""), "text": text, "source": source, "uri": "file:///x",
            "title": "x", "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain", "meta": "{}"}


def _write_curated(ws: Workspace, train: list[dict], validation: list[dict]) -> None:
    write_documents(ws.curated_dir / "train.parquet", train)
    write_documents(ws.curated_dir / "validation.parquet", validation)


CLEAN = [_doc(f"Clean document number {i} with some words in it.") for i in range(10)]


def test_clean_data_passes_and_writes_every_result(tmp_path):
    ws = Workspace(tmp_path)
    _write_curated(ws, CLEAN[:8], CLEAN[8:])
    report = validate(ValidationConfig(min_documents=10, allowed_sources=["local"]), ws)

    assert report.success and not report.skipped and report.documents == 10
    names = [r["name"] for r in report.results]
    assert names == ["row_count", "text_not_null", "text_length", "id_unique", "text_duplicate_share",
                     "source_allowed"]
    saved = json.loads((ws.validation_dir / "result.json").read_text())
    assert saved["success"] is True and len(saved["results"]) == 6
    assert saved["results"][0]["observed"] == 10
    assert set(saved["timings"]) == {"gx_import_s", "gx_run_s"}
    assert "validation passed on 10 documents" in report.render()


def test_nulls_empty_text_and_duplicates_fail_with_names(tmp_path):
    ws = Workspace(tmp_path)
    bad = [_doc(None, doc_id="null-text"), _doc("", doc_id="empty-text"), _doc(CLEAN[0]["text"], doc_id="dupe"),
           _doc("Stray document from an unexpected source.", source="crawler")]
    _write_curated(ws, CLEAN[:8] + bad, CLEAN[8:] + [CLEAN[8]])
    cfg = ValidationConfig(min_documents=100, allowed_sources=["local"])

    with pytest.raises(ValidationFailed) as info:
        validate(cfg, ws)

    err = info.value
    failed = {r["name"]: r for r in err.details["results"] if not r["success"]}
    assert set(failed) == {"row_count", "text_not_null", "text_length", "id_unique", "text_duplicate_share",
                           "source_allowed"}
    for name in failed:
        assert name in err.cause
    assert "observed 15" in err.cause  # the row count
    assert failed["text_not_null"]["samples"] == [{"id": "null-text", "text": None}]
    assert {"id": "empty-text", "text": ""} in failed["text_length"]["samples"]
    assert failed["text_duplicate_share"]["observed"] < 1.0
    assert "FAIL text_not_null" in err.report and "e.g." in err.report
    saved = json.loads((ws.validation_dir / "result.json").read_text())
    assert saved["success"] is False


def test_disabled_validation_is_skipped(tmp_path):
    report = validate(ValidationConfig(enabled=False), Workspace(tmp_path))
    assert report.success and report.skipped and report.results == []


def test_missing_curated_data_says_to_curate_first(tmp_path):
    with pytest.raises(DataError) as info:
        validate(ValidationConfig(), Workspace(tmp_path))
    assert "lmforge curate" in info.value.fix
