"""Which versions held an alias, in order: the registered model's ``lmforge.alias_history.<alias>`` tag.

MLflow keeps only where an alias points now; rollback needs where it pointed before. Every move
lmforge makes (promotion, approval, rollback) rewrites this tag, a JSON list oldest first of
``{"version", "at", "by"}``. A rollback pops the current holder, so a second rollback goes one
further back. Only the last :data:`MAX_ENTRIES` are kept (MLflow caps a tag value at 5000 chars).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_PREFIX = "lmforge.alias_history."
MAX_ENTRIES = 40


def history_tag(alias: str) -> str:
    return f"{TAG_PREFIX}{alias}"


def read_history(client: MlflowClient, name: str, alias: str) -> list[dict[str, Any]]:
    """The recorded holders of ``alias``, oldest first (empty when lmforge never moved it)."""
    raw = client.get_registered_model(name).tags.get(history_tag(alias))
    try:
        entries = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        entries = []  # edited by hand into something else: start a fresh history rather than fail a promotion
    return [e for e in entries if isinstance(e, dict) and "version" in e]


def write_history(client: MlflowClient, name: str, alias: str, entries: list[dict[str, Any]]) -> None:
    client.set_registered_model_tag(name, history_tag(alias), json.dumps(entries[-MAX_ENTRIES:], separators=(",", ":")))


def record_move(client: MlflowClient, name: str, alias: str, version: str, previous: str | None, by: str) -> None:
    """Append ``version`` as the alias's new holder; a holder from before the history existed goes first."""
    entries = read_history(client, name, alias)
    if previous is not None and (not entries or entries[-1]["version"] != previous):
        entries.append({"version": previous, "at": "", "by": "unrecorded"})
    entries.append({"version": str(version), "at": now(), "by": by})
    write_history(client, name, alias, entries)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
