"""Turn a stage's result dict into a Prefect markdown artifact visible in the UI."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

STAGES = ["collect", "curate", "validate", "tokenize", "train", "evaluate", "register", "promote", "deploy"]


def announce(stage: str, what: str) -> None:
    """One progress line per stage, `[k/9] stage: what`, in the terminal and the Prefect UI."""
    get_run_logger().info(f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage}: {what}")


def publish(stage: str, result: dict[str, Any], headline: str = "") -> None:
    """One artifact per stage run, keyed by stage so the UI shows its history over runs."""
    rows = []
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
            if len(value) > 300:
                value = value[:297] + "..."
        rows.append(f"| {key} | {value} |")
    body = f"# {stage}\n\n{headline}\n\n| field | value |\n|---|---|\n" + "\n".join(rows)
    create_markdown_artifact(markdown=body, key=f"lmforge-{stage}", description=f"lmforge {stage} result")
