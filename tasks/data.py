"""Prefect tasks for the data stages: collect, curate, validate."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from lmforge.config import CurationConfig, DataConfig, ValidationConfig
from lmforge.core.workspace import Workspace
from tasks._publish import announce, publish

# The event a collect run emits when new documents arrived; the stack's retrain deployment is triggered by it
# (flows/deployments.py).
DATA_COLLECTED = "lmforge.data.collected"


def workspace_resource(ws: Workspace) -> str:
    """The Prefect resource id of a workspace: the events of one workspace trigger only its own retraining."""
    return f"lmforge.workspace.{ws.home}"


@task(name="collect", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def collect_task(cfg: DataConfig) -> dict[str, Any]:
    announce("collect", "reading sources")
    from lmforge.stages.collect import collect

    ws = Workspace.from_env()
    result = collect(cfg, ws).as_dict()
    publish("collect", result, f"{result['documents_new']} new of {result['documents_total']} documents")
    if result["documents_new"]:
        # Only when something arrived: a collect that found nothing new must not start a retrain.
        emit_event(
            DATA_COLLECTED,
            resource={"prefect.resource.id": workspace_resource(ws)},
            payload={k: result[k] for k in ("documents_total", "documents_new", "bytes", "digest")},
        )
    return result


@task(name="curate", retries=1, cache_policy=NO_CACHE)
def curate_task(cfg: CurationConfig) -> dict[str, Any]:
    announce("curate", "clean, filter, scrub PII, deduplicate")
    from lmforge.stages.curate import curate

    result = curate(cfg, Workspace.from_env()).as_dict()
    publish("curate", result, f"{result['documents_out']} of {result['documents_in']} documents kept")
    return result


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: ValidationConfig) -> dict[str, Any]:
    announce("validate", "Great Expectations data gate")
    from lmforge.core.errors import ValidationFailed
    from lmforge.stages.validate import validate

    try:
        result = validate(cfg, Workspace.from_env()).as_dict()
    except ValidationFailed as exc:
        publish("validate", {"success": False, "report": exc.report or str(exc)}, "data gate FAILED")
        raise
    publish("validate", result, "data gate passed")
    return result
