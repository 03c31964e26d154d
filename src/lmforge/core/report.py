"""Human summaries and the one-line JSON result that every command prints.

With ``--json`` the last stdout line is one JSON object with the same facts as the human summary,
so scripts never parse prose.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

# Human output goes to stderr when --json is given, so stdout stays machine-readable.
_console = Console(stderr=False, highlight=False, soft_wrap=True)
_err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def console(as_json: bool = False) -> Console:
    return _err_console if as_json else _console


def emit(title: str, facts: dict[str, Any], as_json: bool) -> None:
    """Print a table of ``facts`` (to stderr with --json) and, with --json, the JSON line last."""
    out = console(as_json)
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in facts.items():
        table.add_row(key, _fmt(value))
    out.print(table)
    if as_json:
        sys.stdout.write(json.dumps(facts, default=str, sort_keys=True) + "\n")
        sys.stdout.flush()


def run_summary(result: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
    """The facts `lmforge run` promises: model, version, aliases, promotion and why, endpoint."""
    registered, decision = result["register"], result["promote"]
    deployed = result.get("deploy") or {}
    version = str(registered["version"])
    aliases = [decision["alias"]] if str(decision.get("champion_version")) == version else []
    summary = {
        "model_name": registered["name"],
        "version": version,
        "aliases": aliases,
        "promoted": {"promoted": decision["promoted"], "reason": decision["reason"]},
        "promote": promote_summary(decision),
        "champion_version": decision.get("champion_version"),
        "metrics": {k: round(v, 6) if isinstance(v, float) else v
                    for k, v in registered.get("metrics", {}).items()},
        "evaluate": _evaluate_summary(result.get("evaluate") or {}, result.get("evaluate_endpoint") or {}),
        "endpoint": deployed.get("endpoint"),
        "probe": {"prompt": deployed.get("probe_prompt"), "response": deployed.get("probe_response")}
        if deployed else None,
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_run_id": registered.get("run_id"),
        "flow_run_id": result.get("flow_run_id"),
        "documents": result["curate"].get("documents_out"),
        "instructions": record_counts(result["collect"].get("instructions")),
    }
    if result["collect"].get("preferences"):
        summary["preferences"] = record_counts(result["collect"]["preferences"])
    return summary


def promote_summary(decision: dict[str, Any]) -> dict[str, Any]:
    """The promotion decision for scripts: outcome, the rule that decided, each guardrail, the approval."""
    return {
        "decision": decision.get("decision", "promoted" if decision["promoted"] else "rejected"),
        "rule": decision.get("rule"),
        "metric": decision.get("metric"),
        "candidate": decision.get("candidate_value"),
        "champion": decision.get("champion_value"),
        "guardrails": [{k: g[k] for k in ("metric", "candidate", "champion", "tolerance", "kind", "passed")}
                       for g in decision.get("guardrails", [])],
        "approval": decision.get("approval"),
        "card": (decision.get("card") or {}).get("artifact"),
    }


def record_counts(written: dict[str, Any] | None) -> dict[str, Any] | None:
    """An instruction or preference set's counts: records written per split, read and skipped per source."""
    if not written:
        return None
    return {"train": written["train"], "test": written["test"],
            "sources": {label: {"read": r["read"], "skipped": r["skipped"]} for label, r in written["sources"].items()}}


def _evaluate_summary(evaluated: dict[str, Any], endpoint: dict[str, Any]) -> dict[str, Any]:
    """Bits per byte (tokenizer-independent), the lm-eval task scores (in-process and against the
    served endpoint) and the frozen set they were measured on."""
    return {
        "bits_per_byte": evaluated.get("metrics", {}).get("eval_bits_per_byte"),
        "tasks": evaluated.get("tasks", {}),
        "endpoint_tasks": endpoint.get("tasks", {}),
        "frozen_set": (evaluated.get("frozen_set") or {}).get("digest"),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    return "-" if value is None else str(value)
