"""Validate stage: the Great Expectations gate between curated data and training.

Run it with ``lmforge validate CONFIG`` (or ``python -m lmforge.validate [CONFIG]``) after curate.
It checks the curated train and validation documents together against one expectation suite
(row count, no null text, text lengths, unique ids, share of duplicate texts, and optionally the
allowed sources), writes every outcome to ``ws.validation_dir/result.json``, and raises
:class:`ValidationFailed` when any expectation fails, so a flow stops before spending compute.

Great Expectations is imported inside :func:`validate`: importing it takes seconds, and the rest of
the engine must not pay for it. The context is ephemeral, so nothing is written outside the
workspace.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.collect import read_documents
from lmforge.config.stages import ValidationConfig
from lmforge.errors import DataError, ValidationFailed
from lmforge.workspace import Workspace, atomic_write_json

_SAMPLES = 5
_SAMPLE_CHARS = 80


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    results: list[dict] = field(default_factory=list)
    skipped: bool = False
    documents: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        """A readable multi-line report: one line per expectation, samples under failures."""
        if self.skipped:
            return "validation skipped (validation.enabled is false)"
        lines = [f"validation {'passed' if self.success else 'FAILED'} on {self.documents} documents"]
        for r in self.results:
            mark = "ok  " if r["success"] else "FAIL"
            lines.append(f"  {mark} {r['name']:<22} {r['expectation']}: observed {r['observed']}")
            for sample in r["samples"] if not r["success"] else []:
                lines.append(f"         e.g. {json.dumps(sample, ensure_ascii=False)}")
        return "\n".join(lines)


def validate(cfg: ValidationConfig, ws: Workspace) -> ValidationReport:
    """Run the expectation suite on the curated data; raise ValidationFailed on any failure."""
    if not cfg.enabled:
        report = ValidationReport(success=True, skipped=True)
        atomic_write_json(ws.validation_dir / "result.json", report.as_dict())
        return report
    frame = _load_curated(ws)

    started = time.perf_counter()
    import great_expectations as gx  # slow import, paid only by this stage
    from great_expectations.data_context.types.base import ProgressBarsConfig

    imported = time.perf_counter()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("lmforge")
             .add_dataframe_asset("curated")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(gx.ExpectationSuite(name="curated_documents"))
    named = _expectations(cfg)
    for _, expectation in named:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="curated_documents", data=batch, suite=suite))
    outcome = definition.run(batch_parameters={"dataframe": frame}, result_format={
        "result_format": "SUMMARY", "partial_unexpected_count": _SAMPLES,
        "unexpected_index_column_names": ["id"]})
    finished = time.perf_counter()

    by_type = {r.expectation_config.type: r for r in outcome.results}
    results = [_describe(name, by_type[exp.expectation_type]) for name, exp in named]
    report = ValidationReport(
        success=all(r["success"] for r in results), results=results, documents=len(frame),
        timings={"gx_import_s": round(imported - started, 3), "gx_run_s": round(finished - imported, 3)})
    atomic_write_json(ws.validation_dir / "result.json", report.as_dict())
    if not report.success:
        failed = [r for r in results if not r["success"]]
        cause = "data validation failed: " + "; ".join(
            f"{r['name']} ({r['expectation']}) observed {r['observed']}" for r in failed)
        raise ValidationFailed(cause, f"inspect {ws.validation_dir / 'result.json'}, then fix the sources or "
                               "curation settings (or relax the validation section) and rerun collect/curate",
                               report=report.render(), details=report.as_dict())
    return report


def _load_curated(ws: Workspace) -> Any:
    import pandas as pd

    frames = []
    for split in ("train", "validation"):
        path = ws.curated_dir / f"{split}.parquet"
        if not path.exists():
            raise DataError(f"curated data {path} does not exist", "run `lmforge curate CONFIG` first")
        frame = pd.DataFrame(read_documents(path))
        frame["split"] = split
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _expectations(cfg: ValidationConfig) -> list[tuple[str, Any]]:
    """(our name, GX expectation) pairs; each GX expectation type appears once in the suite."""
    import great_expectations.expectations as gxe

    # A proportion of unique values of 1 - f allows a share f of duplicate texts.
    named: list[tuple[str, Any]] = [
        ("row_count", gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_documents)),
        ("text_not_null", gxe.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_length", gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=cfg.min_chars, max_value=cfg.max_chars)),
        ("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        ("text_duplicate_share", gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="text", min_value=1.0 - cfg.max_duplicate_fraction, max_value=1.0)),
    ]
    if cfg.allowed_sources:
        named.append(("source_allowed", gxe.ExpectColumnValuesToBeInSet(
            column="source", value_set=list(cfg.allowed_sources))))
    return named


def _describe(name: str, result: Any) -> dict:
    """One expectation's outcome as plain JSON: name, success, observed value, offending samples."""
    body = result.result or {}
    if "observed_value" in body:
        observed: Any = _plain(body["observed_value"])
    else:
        observed = f"{body.get('unexpected_count', 0)} of {body.get('element_count', 0)} rows unexpected"
        if body.get("missing_count"):
            observed += f", {body['missing_count']} null"
    samples = [{k: _short(v) for k, v in row.items()} for row in body.get("partial_unexpected_index_list") or []]
    error = (result.exception_info or {}).get("exception_message") if not result.success else None
    return {
        "name": name,
        "expectation": result.expectation_config.type,
        "kwargs": _plain(dict(result.expectation_config.kwargs)),
        "success": bool(result.success),
        "observed": observed,
        "samples": samples[:_SAMPLES],
        **({"error": error} if error else {}),
    }


def _short(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, str) and len(value) > _SAMPLE_CHARS:
        return value[:_SAMPLE_CHARS] + "…"
    return value


def _plain(value: Any) -> Any:
    """JSON-safe copy: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float):
        return round(value, 6)
    return value


def main(argv: list[str] | None = None) -> int:
    from lmforge.config.loader import load_config

    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else None)
    report = validate(cfg.validation, Workspace.from_env().ensure())
    print(report.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
