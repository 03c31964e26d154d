"""Where frozen evaluation sets live: the workspace (a cache by digest, one pointer per model name)
and the MLflow registry (the durable home, which outlives any workspace and any data version).

The registry holds a model name's set as an artifact of the run of its first registered version,
``runs:/<run_id>/frozen_eval_set``, named by two registered-model tags: ``lmforge.eval.frozen_set``
(the digest) and ``lmforge.eval.frozen_set_uri``. The first registration of a name publishes
(:func:`publish_evaluation`, called by the register stage); later ones never move it. Resolving
(``evaluation.frozen_set: auto``, :func:`resolve_frozen_set`) asks the registry first, then the
workspace's pointer (a set frozen by an earlier evaluate that was not registered yet), and only then
freezes a new set from the workspace's data.

The workspace's sets and pointers go through its store (:mod:`lmforge.core.storage`): on an
object-store workspace a set is a committed directory ``eval/frozen/<digest>`` in the bucket (read as a
cached copy) and a pointer an object, so an evaluate on one machine and a register on another see
the same set. A set downloaded from the registry is only a cache: it stays on this machine.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import RegistryError
from lmforge.core.storage import open_store
from lmforge.core.storage.recorded import recorded_dir, recorded_file
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen import FrozenSet, load_frozen_set, set_digest
from lmforge.tracking.mlflow_tracker import mlflow_client, mlflow_uris

TAG_DIGEST = "lmforge.eval.frozen_set"
TAG_URI = "lmforge.eval.frozen_set_uri"
TAG_TOKENIZER = "lmforge.eval.tokenizer"  # on each version: the fingerprint of the tokenizer it was scored with
ARTIFACT_PATH = "frozen_eval_set"


def sets_dir(ws: Workspace) -> Path:
    return ws.eval_dir / "frozen"


def resolve_frozen_set(ws: Workspace, platform: PlatformConfig | None, model_name: str,
                       freeze: Callable[[Path], FrozenSet]) -> tuple[FrozenSet, str]:
    """The set for ``model_name`` and where it came from: ``registry``, ``workspace`` or ``new``.

    ``freeze(dest)`` writes a new set from the workspace's data into ``dest``; it runs only when
    neither the registry nor this workspace knows a set for the name.
    """
    registered = registered_set(ws, platform, model_name)
    if registered is not None:
        digest, uri = registered
        return load_frozen_set(_fetch(ws, platform, model_name, digest, uri), expected_digest=digest), "registry"
    store = open_store(ws)
    pointer = _pointer(ws, model_name)
    if store.exists(pointer):
        digest = store.read_json(pointer)["digest"]
        kept = sets_dir(ws) / digest[:16]
        if store.is_committed(kept):
            return load_frozen_set(store.cached_dir(kept), expected_digest=digest), "workspace"
    fresh = freeze_into_cache(ws, freeze)
    store.atomic_write_json(pointer, {"model_name": model_name, "digest": fresh.digest})
    return fresh, "new"


def freeze_into_cache(ws: Workspace, freeze: Callable[[Path], FrozenSet]) -> FrozenSet:
    """Run ``freeze`` into a scratch directory and keep the result in the workspace under its digest
    (a set already kept there stays: the same digest is the same files)."""
    store = open_store(ws)
    staging = sets_dir(ws) / f".staging-{uuid.uuid4().hex[:8]}"  # this machine's side of the workspace
    try:
        fresh = freeze(staging)
        kept = sets_dir(ws) / fresh.digest[:16]
        if not store.is_committed(kept):
            with store.atomic_dir(kept) as out:
                shutil.copytree(staging, out, dirs_exist_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_frozen_set(store.cached_dir(kept), expected_digest=fresh.digest)


def registered_set(ws: Workspace, platform: PlatformConfig | None, model_name: str) -> tuple[str, str] | None:
    """(digest, artifact URI) of the set the registered model ``model_name`` carries, if any."""
    from mlflow.exceptions import MlflowException

    registry_uri = mlflow_uris(ws, platform)[1]
    # A workspace whose SQLite registry was never created has registered nothing; asking would
    # create the database (seconds) just to learn that.
    if registry_uri.startswith("sqlite:///") and not Path(registry_uri.removeprefix("sqlite:///")).exists():
        return None
    try:
        tags = mlflow_client(ws, platform).get_registered_model(model_name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"cannot read registered model {model_name!r} for its frozen evaluation set: {exc}",
                            "start the MLflow server, or set evaluation.frozen_set to 'off' or a set directory") from exc
    digest = tags.get(TAG_DIGEST)
    return (digest, tags.get(TAG_URI, "")) if digest else None


def publish_evaluation(ws: Workspace, platform: PlatformConfig | None, model_name: str, run_id: str,
                       evaluated: dict[str, Any]) -> bool:
    """Log the eval report and task table on ``run_id``; make its frozen set the name's if it has none.

    Returns whether the set was published (only the name's first registration publishes).
    """
    client = mlflow_client(ws, platform)
    for key in ("report_path", "tasks_table"):
        if evaluated.get(key):
            try:  # a path, or the report's URL on an object-store workspace
                report = recorded_file(ws, evaluated[key])
            except FileNotFoundError:
                continue
            if not report.is_file():
                continue
            # By the report's own name: a cached copy is named by its digest.
            client.log_text(run_id, report.read_text(), f"evaluation/{Path(evaluated[key]).name}")
    frozen = evaluated.get("frozen_set") or {}
    if frozen.get("source") in (None, "off") or registered_set(ws, platform, model_name) is not None:
        return False
    client.log_artifacts(run_id, str(recorded_dir(ws, frozen["path"])), ARTIFACT_PATH)
    client.set_registered_model_tag(model_name, TAG_URI, f"runs:/{run_id}/{ARTIFACT_PATH}")
    # The digest tag last: a reader that sees it finds the URI and the files already there.
    client.set_registered_model_tag(model_name, TAG_DIGEST, frozen["digest"])
    return True


def _fetch(ws: Workspace, platform: PlatformConfig | None, model_name: str, digest: str, uri: str) -> Path:
    """The registered set's directory in the workspace cache, downloaded once."""
    cached = sets_dir(ws) / digest[:16]
    if cached.is_dir():
        if set_digest(cached) == digest:
            return cached
        shutil.rmtree(cached)  # a damaged copy: the registry's is the truth
    run_id, _, artifact = uri.removeprefix("runs:/").partition("/")
    if not uri.startswith("runs:/") or not run_id or not artifact:
        raise RegistryError(f"registered model {model_name!r} names its frozen evaluation set {uri!r}, not runs:/RUN/PATH",
                            f"set the registered model's tag {TAG_URI} to the run artifact holding the set")
    staging = sets_dir(ws) / f".download-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        local = Path(mlflow_client(ws, platform).download_artifacts(run_id, artifact, str(staging)))
        return _keep(local, cached.parent, digest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _keep(directory: Path, cache: Path, digest: str) -> Path:
    """Move a complete set directory to its place in the cache (a set already there is kept)."""
    final = cache / digest[:16]
    if not final.is_dir():
        directory.rename(final)
    return final


def _pointer(ws: Workspace, model_name: str) -> Path:
    return sets_dir(ws) / "names" / f"{model_name}.json"
