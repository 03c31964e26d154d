"""Where a LoRA adapter loaded while serving may come from: a directory under ``serving.lora.adapter_roots``,
or a version of the MLflow registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``).

A ``lora_path`` comes from an HTTP client, so a directory is resolved (``..`` and symlinks followed) and
must lie inside one of the allowed roots, and so must the adapter files found in it (a symlinked
``adapter_config.json`` or weights file pointing elsewhere is refused too). A registry version is
downloaded once into ``<serving dir>/adapters/NAME-vVERSION`` (atomically) and must hold a peft LoRA
adapter: at its top, in ``adapter/``, or named by an lmforge adapter marker.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_dir
from lmforge.serving.adapters.lora_slots import find_adapter_dir

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
    """The adapter directory of registry version ``uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``),
    and the version's own URI (``models:/NAME/VERSION``: what an alias names now)."""
    import mlflow.artifacts

    from lmforge.tracking.mlflow_tracker import mlflow_client, mlflow_uris
    from lmforge.tracking.model_uris import registered_version

    found = registered_version(uri, ws)
    if found is None:
        raise ServingError(f"lora_path {uri!r} is not a registry URI", "write models:/NAME@ALIAS or models:/NAME/VERSION")
    name, version = found
    download_uri = mlflow_client(ws).get_model_version_download_uri(name, version)
    target = ws.serving_dir / "adapters" / f"{name}-v{version}"
    marker = target / ".lmforge-source.json"
    if not (marker.is_file() and json.loads(marker.read_text()).get("download_uri") == download_uri):
        with atomic_dir(target) as tmp:
            staging = tmp / ".download"
            fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=str(staging),
                                                               tracking_uri=mlflow_uris(ws)[0]))
            for child in fetched.iterdir():  # MLflow nests a directory download under the URI's last segment
                child.rename(tmp / child.name)
            shutil.rmtree(staging)
            (tmp / marker.name).write_text(json.dumps({"download_uri": download_uri, "name": name,
                                                       "version": version}))
    try:
        return find_adapter_dir(target), f"models:/{name}/{version}"
    except ServingError as exc:
        raise ServingError(f"version {version} of {name!r} holds no LoRA adapter: {exc.cause}",
                           "register a run's peft adapter directory (adapter_config.json, adapter_model.safetensors)"
                           ) from exc
