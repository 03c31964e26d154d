"""Run named expectations on a DataFrame with Great Expectations 1.x and describe each outcome.

One file context per workspace lives in ``ws.validation_dir/gx``; every run stores its results and
updates the Data Docs site there (``gx/uncommitted/data_docs/local_site/index.html``). GX is imported
here only, inside functions: importing it takes seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.config.validation import UserExpectation
from lmforge.core.errors import ConfigError

SAMPLES = 5
_SAMPLE_CHARS = 80
_contexts: dict[str, Any] = {}


def context(root: Path, data_docs: bool):
    """The workspace's GX context (file-backed for Data Docs, else ephemeral), made once per process."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    key = f"{root}:{data_docs}"
    if key not in _contexts:
        ctx = gx.get_context(mode="file", project_root_dir=str(root)) if data_docs else gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        _contexts[key] = ctx
    return _contexts[key]


def user_expectations(items: list[UserExpectation]) -> list[tuple[str, Any]]:
    """(name, expectation) for each expectation in the config; unknown types and bad kwargs are errors."""
    import great_expectations.expectations as gxe

    named = []
    for i, item in enumerate(items):
        class_name = "".join(part.capitalize() for part in item.type.split("_"))
        cls = getattr(gxe, class_name, None)
        if cls is None:
            raise ConfigError(f"validation.expectations[{i}]: Great Expectations has no expectation {item.type!r}",
                              "use a type from the GX expectation gallery, e.g. expect_column_values_to_match_regex")
        try:
            named.append((item.name or item.type, cls(**item.kwargs)))
        except Exception as exc:  # noqa: BLE001 - GX raises pydantic and its own errors for bad arguments
            raise ConfigError(f"validation.expectations[{i}] ({item.type}): invalid kwargs {item.kwargs}: {exc}",
                              "fix the kwargs of that expectation (column names, bounds)") from None
    return named


def run_suite(root: Path, name: str, frame: Any, named: list[tuple[str, Any]], index_column: str,
              data_docs: bool) -> list[dict]:
    """Validate ``frame`` against ``named`` expectations; one described result per expectation, in order."""
    import great_expectations as gx

    ctx = context(root, data_docs)
    batch = (ctx.data_sources.add_or_update_pandas("lmforge")
             .add_dataframe_asset(name).add_batch_definition_whole_dataframe("all"))
    suite = gx.ExpectationSuite(name=name)
    for index, (label, expectation) in enumerate(named):
        expectation.meta = {**(expectation.meta or {}), "lmforge_name": label, "lmforge_index": index}
        suite.add_expectation(expectation)
    suite = ctx.suites.add_or_update(suite)
    definition = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": SAMPLES,
                     "unexpected_index_column_names": [index_column]}
    if data_docs:
        from great_expectations.checkpoint import UpdateDataDocsAction

        checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
            name=name, validation_definitions=[definition], result_format=result_format,
            actions=[UpdateDataDocsAction(name="data_docs")]))
        outcome = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
    else:
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
    by_index = {r.expectation_config.meta["lmforge_index"]: r for r in outcome.results}
    return [describe(label, by_index[i]) for i, (label, _) in enumerate(named)]


def data_docs_index(root: Path) -> Path | None:
    path = root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    return path if path.exists() else None


def describe(name: str, result: Any) -> dict:
    """One expectation's outcome as plain JSON: name, success, observed value, offending samples."""
    body = result.result or {}
    if "observed_value" in body:
        observed: Any = plain(body["observed_value"])
    else:
        observed = f"{body.get('unexpected_count', 0)} of {body.get('element_count', 0)} rows unexpected"
        if body.get("missing_count"):
            observed += f", {body['missing_count']} null"
    samples = [{k: _short(v) for k, v in row.items()} for row in body.get("partial_unexpected_index_list") or []]
    error = (result.exception_info or {}).get("exception_message") if not result.success else None
    kwargs = {k: v for k, v in dict(result.expectation_config.kwargs).items() if k != "batch_id"}
    return {
        "name": name,
        "expectation": result.expectation_config.type,
        "kwargs": plain(kwargs),
        "success": bool(result.success),
        "observed": observed,
        "samples": samples[:SAMPLES],
        **({"error": error} if error else {}),
    }


def _short(value: Any) -> Any:
    value = plain(value)
    if isinstance(value, str) and len(value) > _SAMPLE_CHARS:
        return value[:_SAMPLE_CHARS] + "…"
    return value


def plain(value: Any) -> Any:
    """JSON-safe copy: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float):
        return round(value, 6)
    return value
