"""Registry lookups and ``models:/`` URIs: which registered version a URI names, and its files.

``resolve_model`` downloads ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` into the workspace
for the server (``lmforge serve``, ``lmforge deploy``); the register and promote stages check model
directories and look versions up here.

The model is stored as plain files (config, safetensors, tokenizer), never a pickle, so
``mlflow.artifacts.download_artifacts("models:/NAME@champion")`` gives back a directory that
``from_pretrained`` loads without running any code from the registry.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import DataError, RegistryError
from lmforge.core.workspace import Workspace, atomic_dir
from lmforge.tracking.mlflow_tracker import describe_registry, mlflow_client, mlflow_uris

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))/?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SOURCE_MARKER = ".lmforge-source.json"


def check_model_dir(model_dir: Path) -> None:
    """A servable model directory: config, safetensors weights, a tokenizer, and no pickles."""
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir} has no config.json", "train a model with `lmforge train` or `lmforge run`")
    names = [p.name for p in model_dir.iterdir()]
    if not any(n.endswith(".safetensors") for n in names):
        raise DataError(f"{model_dir} has no .safetensors weights", "save the model with save_pretrained()")
    if not any(n in ("tokenizer.json", "tokenizer_config.json") for n in names):
        raise DataError(f"{model_dir} has no tokenizer files", "save the tokenizer next to the model")
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise DataError(
            f"{model_dir} holds pickled files {pickles}; the registry stores safetensors only",
            "remove them (weights belong in model.safetensors)",
        )


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_version(client: MlflowClient, name: str, version: str, ws: Workspace,
                platform: PlatformConfig | None) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    raise RegistryError(
        f"model {name!r} has no version {version!r} ({describe_registry(ws, platform, name)})",
        "pick an existing version, or register one with `lmforge run`",
    )


def resolve_model(uri: str, ws: Workspace, platform: PlatformConfig | None = None) -> tuple[Path, str, str]:
    """(local directory, model name, version) for ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or a local model directory (version ``"local"``).

    Registry versions are downloaded once into ``ws.serving_dir/models/NAME-vVERSION`` (atomically)
    and reused while the registry still points that version at the same files.
    """
    match = _MODELS_URI.match(uri)
    if match is None:
        local = Path(uri).expanduser()
        if local.is_dir():
            return local.resolve(), local.resolve().name, "local"
        raise RegistryError(
            f"{uri!r} is neither a models:/ URI nor an existing directory",
            "pass models:/NAME@ALIAS (e.g. models:/lmforge-demo@champion), models:/NAME/VERSION, "
            "or a model directory",
        )
    name = match["name"]
    if not _SAFE_NAME.match(name):
        raise RegistryError(f"model name {name!r} in {uri!r} is not a plain name", "use letters, digits, _ . -")
    client = mlflow_client(ws, platform)
    version = _resolve_version(client, ws, platform, name, match["alias"], match["version"])
    download_uri = client.get_model_version_download_uri(name, version)
    target = ws.serving_dir / "models" / f"{name}-v{version}"
    marker = target / SOURCE_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("download_uri") == download_uri:
        return target, name, version
    _download(download_uri, target, mlflow_uris(ws, platform)[0], name, version)
    return target, name, version


def registered_version(uri: str, ws: Workspace, platform: PlatformConfig | None = None) -> tuple[str, str] | None:
    """(name, version) that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names now, without downloading
    anything; None for anything else (a local directory). The deploy stage compares it with what it serves."""
    match = _MODELS_URI.match(uri)
    if match is None:
        return None
    name = match["name"]
    client = mlflow_client(ws, platform)
    return name, _resolve_version(client, ws, platform, name, match["alias"], match["version"])


def _resolve_version(
    client: MlflowClient, ws: Workspace, platform: PlatformConfig | None, name: str, alias: str | None,
    version: str | None,
) -> str:
    _require_registered(client, ws, platform, name)
    if alias is not None:
        found = version_by_alias(client, name, alias)
        if found is None:
            raise RegistryError(
                f"model {name!r} has no alias {alias!r} ({describe_registry(ws, platform, name)})",
                f"promote a version with `lmforge promote`, or use models:/{name}/VERSION",
            )
        return str(found.version)
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        return str(max(int(v.version) for v in versions))
    return str(get_version(client, name, str(version), ws, platform).version)


def _require_registered(client: MlflowClient, ws: Workspace, platform: PlatformConfig | None, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    raise RegistryError(
        f"no registered model {name!r} ({describe_registry(ws, platform, None)})",
        "train and register one with `lmforge run`, or use a name listed by `lmforge models`",
    )


def _download(download_uri: str, target: Path, tracking_uri: str, name: str, version: str) -> None:
    import mlflow.artifacts

    with atomic_dir(target) as tmp:
        # MLflow nests a directory download under the URI's last segment; lift the files out of it.
        staging = tmp / ".download"
        fetched = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=str(staging), tracking_uri=tracking_uri
            )
        )
        for child in fetched.iterdir():
            child.rename(tmp / child.name)
        shutil.rmtree(staging)
        try:
            check_model_dir(tmp)
        except DataError as exc:
            raise RegistryError(
                f"version {version} of {name!r} at {download_uri} is not a servable model: {exc.cause}",
                "register a model directory saved with save_pretrained (safetensors)",
            ) from exc
        marker = {"download_uri": download_uri, "name": name, "version": version}
        (tmp / SOURCE_MARKER).write_text(json.dumps(marker))
