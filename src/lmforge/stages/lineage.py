"""Glue between stages that run apart: what the latest run left in the workspace, and lineage.

The pipeline flow passes results from stage to stage in memory; a stage run alone
(``lmforge evaluate CONFIG``) finds the same facts here, in the JSON hand-offs each stage writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.config import PipelineConfig, config_hash
from lmforge.core.errors import DataError
from lmforge.core.runtime import code_version
from lmforge.core.workspace import Workspace
from lmforge.data.sft import preference_file, sft_file


def require_state(ws: Workspace, stage: str, command: str) -> dict[str, Any]:
    """The hand-off of ``stage``, or a DataError telling which command produces it."""
    state = ws.read_state(stage)
    if state is None:
        raise DataError(f"no {stage} result in workspace {ws.home}",
                        f"run `{command}` first (or `lmforge run` for the whole pipeline)")
    return state


def latest_model_dir(ws: Workspace) -> Path:
    state = require_state(ws, "train", "lmforge train CONFIG")
    model_dir = Path(state["model_dir"])
    if not model_dir.is_dir():
        raise DataError(f"the trained model directory {model_dir} is gone",
                        "run `lmforge train CONFIG` again")
    return model_dir


def dataset_inputs(ws: Workspace) -> list[dict[str, Any]]:
    """The datasets a model saw, each with its content digest, for MLflow lineage."""
    inputs = []
    manifest = ws.raw_dir / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        inputs.append({"name": "raw-documents", "digest": m.get("digest", ""), "path": str(ws.raw_dir),
                       "rows": m.get("documents_total", 0)})
    report = ws.curated_dir / "report.json"
    if report.exists():
        r = json.loads(report.read_text())
        inputs.append({"name": "curated-corpus", "digest": r.get("dataset_digest", ""),
                       "path": str(ws.curated_dir), "rows": r.get("documents_out", 0)})
    for name, train in (("instructions", sft_file(ws, "train")), ("preferences", preference_file(ws, "train"))):
        if train.exists():
            from hashlib import sha256

            data = train.read_bytes()
            inputs.append({"name": name, "digest": sha256(data).hexdigest()[:16],
                           "path": str(train), "rows": data.count(b"\n")})
    return inputs


def data_reports(ws: Workspace) -> list[Path]:
    """The JSON reports of collect, curate and the validation gates that exist in the workspace."""
    candidates = [ws.raw_dir / "manifest.json", ws.curated_dir / "report.json",
                  *sorted(ws.validation_dir.glob("*.json"))]
    return [path for path in candidates if path.is_file()]


def lineage_tags(config: PipelineConfig, ws: Workspace, flow_run_id: str | None) -> dict[str, str]:
    tags = {
        "lmforge.config_hash": config_hash(config),
        "lmforge.code_version": code_version(),
        "lmforge.workspace": str(ws.home),
        "lmforge.flow_run_id": flow_run_id or "none",
    }
    for item in dataset_inputs(ws):
        tags[f"lmforge.data.{item['name']}.digest"] = str(item["digest"])
    return tags
