"""What a deployment serves, and where: the release it resolves and the tags it leaves on model versions.

A *release* is what the deploy stage decided to serve, fixed before any server starts: for a
registry URI (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) the registered name, the version
it names now, the alias (if any) and the version's run id; for a model directory its path and a
fingerprint of its files (so a retrained directory at the same path counts as a change). The server
reports it in ``/health`` and ``/v1/models``; the deploy compares it with the running one to do
nothing when nothing moved.

The version being served carries ``lmforge.deploy.deployed_at`` and ``lmforge.deploy.endpoint``;
when a version stops being served those go and ``lmforge.deploy.retired_at`` says when.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.core.workspace import Workspace
from lmforge.tracking.alias_history import now
from lmforge.tracking.mlflow_tracker import mlflow_client
from lmforge.tracking.model_uris import registered_version

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_DEPLOYED_AT = "lmforge.deploy.deployed_at"
TAG_ENDPOINT = "lmforge.deploy.endpoint"
TAG_RETIRED_AT = "lmforge.deploy.retired_at"
_ALIAS = re.compile(r"^models:/[^/@]+@(?P<alias>[^/@]+)/?$")


def resolve_release(model_ref: str, ws: Workspace) -> dict[str, str]:
    """What ``model_ref`` names now: ``{model_ref, registered_name, version, alias, run_id, source}``.

    ``source`` is what the server is started with: ``models:/NAME/VERSION`` pinned, so the server
    loads exactly the version decided here even if the alias moves meanwhile; or the directory."""
    found = registered_version(model_ref, ws)
    if found is None:
        path = Path(model_ref).expanduser().resolve()
        return {"model_ref": model_ref, "registered_name": "", "version": "local", "alias": "", "run_id": "",
                "source": str(path), "fingerprint": fingerprint(path)}
    name, version = found
    run_id = mlflow_client(ws).get_model_version(name, version).run_id or ""
    match = _ALIAS.match(model_ref)
    return {"model_ref": model_ref, "registered_name": name, "version": version,
            "alias": match["alias"] if match else "", "run_id": run_id, "source": f"models:/{name}/{version}"}


def same_release(a: dict[str, str] | None, b: dict[str, str]) -> bool:
    """Whether two releases serve the same model (the alias URI may differ in nothing that matters)."""
    keys = ("registered_name", "version", "source", "fingerprint")
    return a is not None and all(a.get(k, "") == b.get(k, "") for k in keys)


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a directory's files: cheap, and changes when training rewrites it."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def mark_deployed(ws: Workspace, release: dict[str, str], endpoint: str,
                  previous: dict[str, str] | None = None) -> None:
    """Tag the served version (``deployed_at``, ``endpoint``); untag ``previous`` if it is another version."""
    if not release.get("registered_name"):
        return  # a model directory: no registry version to tag
    client = mlflow_client(ws)
    name, version = release["registered_name"], release["version"]
    client.set_model_version_tag(name, version, TAG_DEPLOYED_AT, now())
    client.set_model_version_tag(name, version, TAG_ENDPOINT, endpoint)
    client.delete_model_version_tag(name, version, TAG_RETIRED_AT)  # a no-op when absent
    if previous and previous.get("registered_name") and not same_release(previous, release):
        mark_retired(client, previous["registered_name"], previous["version"])


def mark_retired(client: MlflowClient, name: str, version: str) -> None:
    """The version is no longer served here: drop its deployment tags, record when (a deleted version: nothing)."""
    from mlflow.exceptions import MlflowException

    try:
        for key in (TAG_DEPLOYED_AT, TAG_ENDPOINT):
            client.delete_model_version_tag(name, version, key)
        client.set_model_version_tag(name, version, TAG_RETIRED_AT, now())
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise


def retire(ws: Workspace, release: dict[str, str] | None) -> None:
    """``mark_retired`` for a stopped deployment's release (nothing for a model directory)."""
    if release and release.get("registered_name"):
        mark_retired(mlflow_client(ws), release["registered_name"], release["version"])
