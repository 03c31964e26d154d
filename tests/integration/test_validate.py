"""Validate stage: the real Great Expectations suite on curated files in a temporary workspace."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from lmforge.config.validation import UserExpectation, ValidationConfig
from lmforge.core.errors import ConfigError, DataError, ValidationFailed
from lmforge.core.workspace import Workspace
from lmforge.data.documents import text_id, write_documents
from lmforge.stages.validate import validate


def _doc(text: str | None, doc_id: str | None = None, source: str = "local", language: str = "en") -> dict:
    return {"id": doc_id or text_id(text or ""), "text": text, "source": source, "uri": "file:///x",
            "title": "x", "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain",
            "meta": json.dumps({"language": language})}


def _write_curated(ws: Workspace, train: list[dict], validation: list[dict]) -> None:
    write_documents(ws.curated_dir / "train.parquet", train)
    write_documents(ws.curated_dir / "validation.parquet", validation)


TOPICS = ["rivers", "violins", "glaciers", "bread", "bees", "chess", "tea", "lighthouses", "walls", "birds"]
CLEAN = [_doc(f"Clean document number {i} about {topic}, written in plain words for the validation test.")
         for i, topic in enumerate(TOPICS)]
NAMES = ["row_count", "text_not_null", "text_length", "id_unique", "text_duplicate_share", "no_pii",
         "no_eval_overlap"]


class RecordingTracker:
    """A Tracker that keeps what it is given (the real MLflow tracker is exercised by the pipeline tests)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifacts(self, local_dir, artifact_path):
        self.artifacts.append(artifact_path)


def test_clean_data_passes_writes_results_data_docs_and_logs(tmp_path):
    ws = Workspace(tmp_path)
    _write_curated(ws, CLEAN[:8], CLEAN[8:])
    tracker = RecordingTracker()
    report = validate(ValidationConfig(min_documents=10, allowed_sources=["local"], languages=["en"]), ws, tracker)

    assert report.success and not report.skipped and report.documents == 10
    assert [r["name"] for r in report.results] == [*NAMES, "source_allowed", "language_share"]
    saved = json.loads((ws.validation_dir / "result.json").read_text())
    assert saved["success"] is True and saved["results"][0]["observed"] == 10
    assert set(saved["timings"]) == {"gx_import_s", "gx_run_s"}
    assert "validation passed on 10 rows" in report.render()
    assert report.data_docs and "curated_documents" in (ws.validation_dir / "gx").joinpath(
        "uncommitted", "data_docs", "local_site", "index.html").read_text()
    assert tracker.metrics["validation.curated_documents.success"] == 1.0 and tracker.artifacts == ["validation"]


def test_injected_nulls_pii_duplicates_and_eval_overlap_fail_with_names(tmp_path):
    ws = Workspace(tmp_path)
    ws.sft_dir.mkdir(parents=True)
    answer = "Glaciers move because ice deforms under its own weight and slides over meltwater."
    (ws.sft_dir / "test.jsonl").write_text(json.dumps({"instruction": "Why do glaciers move?", "response": answer}))
    bad = [_doc(None, doc_id="null-text"), _doc("", doc_id="empty-text"), _doc(CLEAN[0]["text"], doc_id="dupe"),
           _doc("Write to jane.doe@mail.example.com or call +1 415 555 0133 for the tickets.", doc_id="pii"),
           _doc("Stray document from an unexpected source.", source="crawler"),
           _doc("Notes: " + answer, doc_id="contaminated"), _doc(CLEAN[9]["text"] + " ", doc_id="leak"),
           _doc("Ein deutscher Text über Flüsse und Berge.", doc_id="german", language="de")]
    _write_curated(ws, CLEAN[:8] + bad, [*CLEAN[8:], CLEAN[8]])
    cfg = ValidationConfig(min_documents=100, allowed_sources=["local"], languages=["en"], min_language_share=0.99)

    with pytest.raises(ValidationFailed) as info:
        validate(cfg, ws)

    err = info.value
    failed = {r["name"]: r for r in err.details["results"] if not r["success"]}
    assert set(failed) == {*NAMES, "source_allowed", "language_share"}
    for name in failed:
        assert name in err.cause
    assert "observed 19" in err.cause  # the row count
    assert failed["text_not_null"]["samples"] == [{"id": "null-text", "text": None}]
    assert {"id": "empty-text", "text": ""} in failed["text_length"]["samples"]
    assert [s["id"] for s in failed["no_pii"]["samples"]] == ["pii"]
    assert sorted(s["id"] for s in failed["no_eval_overlap"]["samples"]) == ["contaminated", "leak"]
    assert [s["id"] for s in failed["language_share"]["samples"]] == ["german"]
    assert "FAIL text_not_null" in err.report and "e.g." in err.report
    assert json.loads((ws.validation_dir / "result.json").read_text())["success"] is False


def test_user_expectations_from_config(tmp_path):
    ws = Workspace(tmp_path)
    _write_curated(ws, CLEAN[:8], CLEAN[8:])
    rule = UserExpectation(type="expect_column_values_to_match_regex", name="mentions_document",
                           kwargs={"column": "text", "regex": "^Clean document"})
    cfg = ValidationConfig(min_documents=1, data_docs=False, expectations=[rule])
    assert validate(cfg, ws).results[-1]["name"] == "mentions_document"
    strict = UserExpectation(type="expect_column_values_to_match_regex", kwargs={"column": "text", "regex": "^Never"})
    with pytest.raises(ValidationFailed, match="expect_column_values_to_match_regex"):
        validate(ValidationConfig(min_documents=1, data_docs=False, expectations=[strict]), ws)
    unknown = UserExpectation(type="expect_text_to_be_poetry")
    with pytest.raises(ConfigError, match="expect_text_to_be_poetry"):
        validate(ValidationConfig(min_documents=1, data_docs=False, expectations=[unknown]), ws)


def test_cli_gate_fails_with_the_report(tmp_path):
    ws = Workspace(tmp_path / "home")
    _write_curated(ws, [*CLEAN[:8], _doc(None, doc_id="null-text")], CLEAN[8:])
    config = tmp_path / "c.yaml"
    config.write_text("validation:\n  min_documents: 5\n  data_docs: false\n")
    done = run_cli(["validate", str(config)], ws.home)
    assert done.returncode == 2
    assert "text_not_null" in done.stderr and "null-text" in done.stderr and "Traceback" not in done.stderr


def test_disabled_validation_is_skipped(tmp_path):
    report = validate(ValidationConfig(enabled=False), Workspace(tmp_path))
    assert report.success and report.skipped and report.results == []


def test_missing_curated_data_says_to_curate_first(tmp_path):
    with pytest.raises(DataError) as info:
        validate(ValidationConfig(), Workspace(tmp_path))
    assert "lmforge curate" in info.value.fix
