"""The train stage: pretraining then fine-tuning of the configured model on the workspace's data.

Run it with ``lmforge train CONFIG [--json]`` (or ``python -m lmforge.train CONFIG``). It checks
its inputs before any worker starts, hands one job to :func:`lmforge.train.launch.fit` (in this
process or as Ray Train workers), and writes ``runs/<run_id>/train_result.json`` and the ``train``
state hand-off that evaluate and register read.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmforge.config.model import ModelConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.train.launch import check_inputs, fit
from lmforge.train.methods.catalog import method_info

DEFAULT_HELDOUT_FRACTION: float = TokenizeConfig.model_fields["finetune_heldout_fraction"].default


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_dir: Path
    adapter_dir: Path | None
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        out["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return out


def train(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace, run_name: str | None = None,
          progress: Callable[[dict], None] | None = None, ray_address: str | None = None,
          resume: str | None = None, finetune_heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> TrainResult:
    """Train a model from ``ws``'s tokenizer and data; return where it is and how it went.

    ``progress`` receives each history row (live in-line; replayed after the run under Ray).
    Env ``RAY_ADDRESS`` (else ``ray_address``, i.e. ``platform.ray_address``) names an existing
    cluster; otherwise a local Ray is started when ``training.placement.use_ray`` is set. ``resume`` names
    an earlier run whose latest checkpoint this run continues exactly (same model and method).
    ``finetune_heldout_fraction`` is the pipeline's ``tokenize.finetune_heldout_fraction``: when
    no tokenized datasets fit, fine-tuning holds out those SFT records itself, as tokenize would.
    """
    started = time.perf_counter()
    check_inputs(training, model_cfg, ws)
    run_id = resume or _new_run_id(run_name)
    job = {"training": training.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"),
           "home": str(ws.home), "run_id": run_id, "resume": bool(resume),
           "finetune_heldout_fraction": finetune_heldout_fraction}
    outcome = fit(job, training, ws, ray_address, progress)
    run_dir = ws.runs_dir / run_id
    adapted = training.finetunes and method_info(training.method).adapts
    params = {**_flatten({"training": job["training"], "model": job["model"]}), **outcome["params"]}
    result = TrainResult(run_id=run_id, model_dir=run_dir / "model",
                         adapter_dir=run_dir / "adapter" if adapted else None,
                         history=outcome["history"], metrics=outcome["metrics"], params=params,
                         duration_s=round(time.perf_counter() - started, 3))
    atomic_write_json(run_dir / "train_result.json", result.as_dict())
    ws.write_state("train", result.as_dict())
    return result


def _new_run_id(run_name: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "train").strip("-.") or "train"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}-{uuid.uuid4().hex[:6]}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat
