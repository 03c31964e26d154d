"""Glue between stages that run apart: what the latest run left in the workspace, and lineage.

The pipeline flow passes results from stage to stage in memory; a stage run alone
(``lmforge evaluate CONFIG``) finds the same facts here, in the JSON hand-offs each stage writes.
On an object-store workspace (``LMFORGE_HOME=s3://...``) everything here is read through the store:
the trained model as a cached copy, the data reports as cached files, so lineage and registration
work from any machine.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import Any

from lmforge.config import PipelineConfig, config_hash
from lmforge.core.errors import DataError
from lmforge.core.runtime import code_version
from lmforge.core.storage import open_store
from lmforge.core.storage.recorded import recorded_dir
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace
from lmforge.data.sft import preference_file, sft_file


def require_state(ws: Workspace, stage: str, command: str) -> dict[str, Any]:
    """The hand-off of ``stage``, or a DataError telling which command produces it."""
    state = ws.read_state(stage)
    if state is None:
        raise DataError(f"no {stage} result in workspace {ws.location}",
                        f"run `{command}` first (or `lmforge run` for the whole pipeline)")
    return state


def latest_model(ws: Workspace) -> str:
    """Where the latest trained model is, as the train hand-off names it (a path, or a URL on an
    object store); a DataError when it is gone. :func:`recorded_dir` gives a local copy."""
    return str(_latest(ws)[0])


def latest_model_dir(ws: Workspace) -> Path:
    """The latest trained model as a local directory (a cached copy on an object-store workspace)."""
    return _latest(ws)[1]


def _latest(ws: Workspace) -> tuple[str, Path]:
    state = require_state(ws, "train", "lmforge train CONFIG")
    try:
        model_dir = recorded_dir(ws, state["model_dir"])
    except FileNotFoundError:
        model_dir = None
    if model_dir is None or not model_dir.is_dir():
        raise DataError(f"the trained model directory {state['model_dir']} is gone",
                        "run `lmforge train CONFIG` again")
    return state["model_dir"], model_dir


def dataset_inputs(ws: Workspace) -> list[dict[str, Any]]:
    """The datasets a model saw, each with its content digest, for MLflow lineage."""
    store = open_store(ws)
    inputs = []
    manifest = ws.raw_dir / "manifest.json"
    if store.exists(manifest):
        m = store.read_json(manifest)
        inputs.append({"name": "raw-documents", "digest": m.get("digest", ""), "path": store.uri(ws.raw_dir),
                       "rows": m.get("documents_total", 0)})
    report = ws.curated_dir / "report.json"
    if store.exists(report):
        r = store.read_json(report)
        inputs.append({"name": "curated-corpus", "digest": r.get("dataset_digest", ""),
                       "path": store.uri(ws.curated_dir), "rows": r.get("documents_out", 0)})
    sets = (ws.sft_dir, ws.curated_sft_dir, ws.preferences_dir, ws.curated_preferences_dir)
    # Which record file counts (curated or collected) is data.sft's rule on local files: a view.
    with local_view(ws, sets) as view:
        for name, train in (("instructions", sft_file(view, "train")), ("preferences", preference_file(view, "train"))):
            if train.exists():
                data = train.read_bytes()
                where = ws.home / train.relative_to(view.home)
                inputs.append({"name": name, "digest": sha256(data).hexdigest()[:16],
                               "path": store.uri(where), "rows": data.count(b"\n")})
    return inputs


def data_reports(ws: Workspace) -> list[Path]:
    """The JSON reports of collect, curate and the validation gates that exist in the workspace.

    Local files: on an object-store workspace pass a view of
    :func:`report_inputs` (``local_view(ws, report_inputs(ws))``), whose names stay the reports' own.
    """
    candidates = [ws.raw_dir / "manifest.json", ws.curated_dir / "report.json",
                  *sorted(ws.validation_dir.glob("*.json"))]
    return [path for path in candidates if path.is_file()]


def report_inputs(ws: Workspace) -> list[Path]:
    """What :func:`data_reports` reads, for a local view of an object-store workspace."""
    return [ws.raw_dir / "manifest.json", ws.curated_dir / "report.json", ws.validation_dir]


def lineage_tags(config: PipelineConfig, ws: Workspace, flow_run_id: str | None) -> dict[str, str]:
    tags = {
        "lmforge.config_hash": config_hash(config),
        "lmforge.code_version": code_version(),
        "lmforge.workspace": ws.location,
        "lmforge.flow_run_id": flow_run_id or "none",
    }
    for item in dataset_inputs(ws):
        tags[f"lmforge.data.{item['name']}.digest"] = str(item["digest"])
    return tags
