"""Where a LoRA adapter loaded while serving may come from: a directory under ``serving.lora.adapter_roots``,
or a version of the MLflow registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``).

A ``lora_path`` comes from an HTTP client, so a directory is resolved (``..`` and symlinks followed) and
must lie inside one of the allowed roots, and so must the adapter files found in it (a symlinked
``adapter_config.json`` or weights file pointing elsewhere is refused too). A registry version is
downloaded once into ``<serving dir>/adapters/NAME-vVERSION`` (atomically) and must hold a peft LoRA
adapter: at its top, in ``adapter/``, or named by an lmforge adapter marker; a pipeline LoRA run's version
(which holds the merged model) brings its run's unmerged ``adapter`` artifact instead, with the record of its
base, which must be the served model (``lmforge.tracking.adapter_base``; checked by ``lora_slots.read_adapter``
for an adapter from anywhere that carries such a record).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_dir
from lmforge.serving.adapters.lora_slots import find_adapter_dir
from lmforge.tracking.adapter_base import ADAPTER_ARTIFACT, TAG_ADAPTER

if TYPE_CHECKING:
    from mlflow import MlflowClient

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def inside_roots(lora_path: str, roots: list[str]) -> Path:
    """The adapter directory that ``lora_path`` names, checked to lie (files included) inside one of ``roots``."""
    if not roots:
        raise ServingError(f"lora_path {lora_path!r} is a directory, and serving.lora.adapter_roots allows none",
                           "list the directories adapters may be loaded from in serving.lora.adapter_roots, or "
                           "load a registered adapter (lora_path models:/NAME@ALIAS)")
    allowed = [Path(root).expanduser().resolve() for root in roots]
    path = Path(lora_path).expanduser().resolve()
    fix = f"load adapters from inside serving.lora.adapter_roots ({', '.join(str(r) for r in allowed)})"
    if not any(path.is_relative_to(root) for root in allowed):
        raise ServingError(f"lora_path {lora_path!r} is outside the allowed adapter roots", fix)
    adapter_dir = find_adapter_dir(path).resolve()
    for file in [adapter_dir, *(adapter_dir / name for name in _ADAPTER_FILES)]:
        if not any(file.resolve().is_relative_to(root) for root in allowed):
            raise ServingError(f"lora_path {lora_path!r} reaches {file.resolve()} through a link, outside the "
                               "allowed adapter roots", fix)
    return adapter_dir


def from_registry(uri: str, ws: Workspace) -> tuple[Path, str]:
    """The adapter directory of registry version ``uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) and the
    version's own URI (``models:/NAME/VERSION``: what an alias names now). ``read_adapter`` checks the adapter against
    the served model's weights when it records its base, as it does any adapter's.

    A pipeline LoRA run's version (tag ``lmforge.adapter: lora``) holds the merged model; its unmerged adapter is the
    run's ``adapter`` artifact, fetched through the version's ``run_id`` (never the merged weights). Any other
    version's own files are fetched, and when they hold no adapter, its run's ``adapter`` artifact if it has one.
    """
    from lmforge.tracking.mlflow_tracker import mlflow_client
    from lmforge.tracking.model_uris import registered_version

    found = registered_version(uri, ws)
    if found is None:
        raise ServingError(f"lora_path {uri!r} is not a registry URI", "write models:/NAME@ALIAS or models:/NAME/VERSION")
    name, version = found
    client = mlflow_client(ws)
    registered = client.get_model_version(name, version)
    kind, run_id = (registered.tags or {}).get(TAG_ADAPTER), registered.run_id
    target = ws.serving_dir / "adapters" / f"{name}-v{version}"
    adapter_dir: Path | None
    if kind == "lora" and run_id:
        adapter_dir = _run_adapter(client, run_id, target)
    else:
        adapter_dir = _version_adapter(client, ws, name, version, target)
        if adapter_dir is None and run_id and _has_run_adapter(client, run_id):
            adapter_dir = _run_adapter(client, run_id, target.with_name(target.name + "-run"))
    if adapter_dir is None:
        what = f"is a {kind} run's (its adapter is no LoRA)" if kind else "holds no LoRA adapter"
        raise ServingError(f"version {version} of {name!r} {what}: neither its files nor its run's "
                           f"{ADAPTER_ARTIFACT!r} artifact hold adapter_config.json",
                           f"load a version registered from a LoRA run (lmforge.adapter: lora), or serve this one on "
                           f"its own (lmforge serve models:/{name}/{version})")
    return adapter_dir, f"models:/{name}/{version}"


def _version_adapter(client: MlflowClient, ws: Workspace, name: str, version: str, target: Path) -> Path | None:
    """The adapter in the version's own files (downloaded once), or None when they hold none."""
    import mlflow.artifacts

    from lmforge.tracking.mlflow_tracker import mlflow_uris

    download_uri = client.get_model_version_download_uri(name, version)
    _download_once(target, download_uri, lambda dst: mlflow.artifacts.download_artifacts(
        artifact_uri=download_uri, dst_path=str(dst), tracking_uri=mlflow_uris(ws)[0]))
    try:
        return find_adapter_dir(target)
    except ServingError:
        return None


def _has_run_adapter(client: MlflowClient, run_id: str) -> bool:
    return any(Path(item.path).name == "adapter_config.json" for item in client.list_artifacts(run_id, ADAPTER_ARTIFACT))


def _run_adapter(client: MlflowClient, run_id: str, target: Path) -> Path:
    """The run's ``adapter`` artifact, downloaded once into ``target``."""
    _download_once(target, f"runs:/{run_id}/{ADAPTER_ARTIFACT}",
                   lambda dst: client.download_artifacts(run_id, ADAPTER_ARTIFACT, str(dst)))
    return find_adapter_dir(target)


def _download_once(target: Path, source: str, download: Callable[[Path], str]) -> None:
    """``target`` = the files of ``source``, fetched by ``download`` (into a directory; it returns where they landed)
    unless ``target`` already holds them, atomically."""
    marker = target / ".lmforge-source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("download_uri") == source:
        return
    with atomic_dir(target) as tmp:
        staging = tmp / ".download"
        fetched = Path(download(staging))
        for child in fetched.iterdir():  # MLflow nests a directory download under the URI's last segment
            child.rename(tmp / child.name)
        shutil.rmtree(staging)
        (tmp / marker.name).write_text(json.dumps({"download_uri": source}))
