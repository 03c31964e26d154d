"""Validate stage: the Great Expectations gates between data and training.

Run it with ``lmforge validate CONFIG`` (or ``python -m lmforge.stages.validate [CONFIG]``) after curate.
:func:`validate` checks the curated corpus (row count, no null text, text lengths, unique ids,
duplicate share, no PII left, no overlap with evaluation sets, language share, allowed sources,
and the user's own expectations from ``validation.expectations``) and, when collect wrote them, the
instruction/chat and preference sets (``validation.records``: role order, empty turns, an assistant
turn, length, turn count, duplicate share, PII left, chosen != rejected); :func:`validate_tokenized`,
run by the tokenize stage, checks the tokenized datasets (sequence lengths, unknown tokens, label
masking, disjoint splits). Each writes ``ws.validation_dir/<suite>.json`` (the corpus suite also
``result.json``), updates the Data Docs in ``ws.validation_dir/gx``, logs to a tracker when one is
given, and raises :class:`ValidationFailed` naming every failed expectation, its observed value
and sample rows, so a flow stops before spending compute.

On an object-store workspace (``LMFORGE_HOME=s3://...``) :func:`validate` runs the suites on a local
view (:func:`local_view`: cached copies of the curated and collected sets in a scratch home) and
commits ``ws.validation_dir`` to the store at the end, a failing run's results included.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from lmforge.config.loader import load_config
from lmforge.config.validation import ValidationConfig
from lmforge.core.errors import ValidationFailed
from lmforge.core.storage import open_store
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.data.tokenized import stored_inputs
from lmforge.tracking.tracker import Tracker
from lmforge.validation import corpus, records, tokenized
from lmforge.validation.gx_suite import data_docs_index, run_suite


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    results: list[dict] = field(default_factory=list)
    skipped: bool = False
    documents: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    suite: str = "curated_documents"
    data_docs: str | None = None
    record_sets: list[ValidationReport] = field(default_factory=list)  # the SFT and preference suites' reports

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        """A readable multi-line report: one line per expectation, samples under failures."""
        if self.skipped:
            return "validation skipped (validation.enabled is false)"
        lines = [f"{self.suite}: validation {'passed' if self.success else 'FAILED'} on {self.documents} rows"]
        for r in self.results:
            mark = "ok  " if r["success"] else "FAIL"
            lines.append(f"  {mark} {r['name']:<22} {r['expectation']}: observed {r['observed']}")
            for sample in r["samples"] if not r["success"] else []:
                lines.append(f"         e.g. {json.dumps(sample, ensure_ascii=False)}")
        if self.data_docs:
            lines.append(f"  Data Docs: {self.data_docs}")
        return "\n".join([*lines, *(r.render() for r in self.record_sets)])


def validate(cfg: ValidationConfig, ws: Workspace, tracker: Tracker | None = None) -> ValidationReport:
    """Run the curated-corpus suite; raise ValidationFailed on any failure."""
    inputs = (ws.curated_dir, ws.sft_dir, ws.preferences_dir, ws.curated_sft_dir, ws.curated_preferences_dir)
    with local_view(ws, inputs, [ws.validation_dir]) as view:
        try:
            # Reports name the Data Docs where they are kept, not the view's scratch copy.
            docs_at = open_store(ws).uri(ws.validation_dir) if view is not ws else None
            return _validate(cfg, view, tracker, docs_at)
        except ValidationFailed as exc:
            if view is not ws:  # name the results where they are kept, not the scratch view's copies
                exc.fix = exc.fix.replace(str(view.validation_dir), open_store(ws).uri(ws.validation_dir))
            raise


def _validate(cfg: ValidationConfig, ws: Workspace, tracker: Tracker | None, docs_at: str | None) -> ValidationReport:
    if not cfg.enabled:
        report = ValidationReport(success=True, skipped=True)
        atomic_write_json(ws.validation_dir / "result.json", report.as_dict())
        return report

    frame = corpus.load_frame(ws)
    report = _run(cfg, ws, "curated_documents", frame, lambda: corpus.expectations(cfg, len(frame)), "id", tracker,
                  docs_at)
    sets = []
    for name, suite in records.SUITES.items():
        rows = records.load_frame(ws, name)
        if rows is not None:
            sets.append(_run(cfg, ws, suite, rows, lambda rows=rows, name=name: records.expectations(
                cfg.records, len(rows), name == "preferences"), "record", tracker, docs_at))
    report = replace(report, record_sets=sets)
    atomic_write_json(ws.validation_dir / "result.json", report.as_dict())
    _raise_failed(ws, report, [report, *sets], "fix the sources or curation settings (or relax the validation "
                  "section) and rerun collect/curate")
    return report


def validate_tokenized(cfg: ValidationConfig, ws: Workspace, tracker: Tracker | None = None) -> ValidationReport:
    """Run the tokenized-dataset suite on the latest tokenized datasets."""
    if not cfg.enabled:
        return ValidationReport(success=True, skipped=True, suite="tokenized_datasets")

    # On an object store: cached copies of the datasets, and the suite's results added to the stored ones.
    inputs = [ws.tokenizer_dir, *stored_inputs(ws), ws.validation_dir] if ws.is_remote else []
    with local_view(ws, inputs, [ws.validation_dir]) as view:
        frame, manifest = tokenized.load_frame(view)
        try:
            return _gate(cfg, view, "tokenized_datasets", frame, lambda: tokenized.expectations(cfg, manifest),
                         "row", tracker, fix="check the tokenizer and seq_len settings (model, training.*.seq_len), "
                         "then rerun `lmforge tokenize CONFIG`")
        except ValidationFailed as exc:
            if view is not ws:
                exc.fix = exc.fix.replace(str(view.validation_dir), open_store(ws).uri(ws.validation_dir))
            raise


def _gate(cfg: ValidationConfig, ws: Workspace, suite: str, frame, build, index_column: str,
          tracker: Tracker | None, fix: str) -> ValidationReport:
    report = _run(cfg, ws, suite, frame, build, index_column, tracker)
    _raise_failed(ws, report, [report], fix)
    return report


def _run(cfg: ValidationConfig, ws: Workspace, suite: str, frame, build, index_column: str,
         tracker: Tracker | None, docs_at: str | None = None) -> ValidationReport:
    """Run one suite; write ``<suite>.json`` and log it (the caller decides whether the gate fails)."""

    started = time.perf_counter()
    named = build()  # imports GX
    imported = time.perf_counter()
    results = run_suite(ws.validation_dir, suite, frame, named, index_column, cfg.data_docs)
    finished = time.perf_counter()
    docs = data_docs_index(ws.validation_dir) if cfg.data_docs else None
    report = ValidationReport(
        success=all(r["success"] for r in results), results=results, documents=len(frame),
        timings={"gx_import_s": round(imported - started, 3), "gx_run_s": round(finished - imported, 3)},
        suite=suite, data_docs=_shown(docs, ws, docs_at))
    atomic_write_json(ws.validation_dir / f"{suite}.json", report.as_dict())
    if tracker is not None:
        _log(tracker, report, ws)
    return report


def _shown(docs, ws: Workspace, docs_at: str | None) -> str | None:
    """Where the user finds the Data Docs: the local file, or its URL under ``docs_at`` on a store."""
    if docs is None:
        return None
    return str(docs) if docs_at is None else f"{docs_at}/{docs.relative_to(ws.validation_dir).as_posix()}"


def _raise_failed(ws: Workspace, report: ValidationReport, suites: list[ValidationReport], fix: str) -> None:
    """ValidationFailed naming every failed expectation of every failed suite; ``report`` is what the user reads."""
    failed = [s for s in suites if not s.success]
    if not failed:
        return
    cause = "; ".join(f"{s.suite} validation failed: " + "; ".join(
        f"{r['name']} ({r['expectation']}) observed {r['observed']}" for r in s.results if not r["success"])
        for s in failed)
    files = ", ".join(str(ws.validation_dir / f"{s.suite}.json") for s in failed)
    raise ValidationFailed(cause, f"inspect {files}, then {fix}", report=report.render(), details=report.as_dict())


def _log(tracker: Tracker, report: ValidationReport, ws: Workspace) -> None:
    metrics = {f"validation.{report.suite}.success": float(report.success)}
    for r in report.results:
        metrics[f"validation.{report.suite}.{r['name']}"] = float(r["success"])
        if isinstance(r["observed"], (int, float)) and not isinstance(r["observed"], bool):
            metrics[f"validation.{report.suite}.{r['name']}.observed"] = float(r["observed"])
    tracker.log_metrics(metrics)
    tracker.log_artifacts(ws.validation_dir, "validation")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else None)
    report = validate(cfg.validation, Workspace.from_env().ensure())
    print(report.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
