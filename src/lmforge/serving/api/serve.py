"""Serve a model by name: the public entry points behind ``lmforge serve`` and ``python -m lmforge.serving``.

:func:`resolve_model_dir` turns what a user names (a model directory, or a registry URI
``models:/NAME@ALIAS`` resolved in the workspace) into a local directory and a default model name;
the CLI's ``serve`` and ``export-onnx`` commands and the server use it. :func:`serve_model` serves
it until interrupted; :func:`parse_adapters`, :func:`load_serving_config` and :func:`api_key_from`
read the command-line forms of ``serving.adapters``, of a serving-config file and of the API key.
A path that is no model directory is refused here, before anything heavy is imported or loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.config.base import updated
from lmforge.config.loader import parse_section
from lmforge.config.serving import ServingConfig
from lmforge.config.yaml_file import parse_yaml, read_text
from lmforge.core.errors import ConfigError, ServingError
from lmforge.core.workspace import Workspace, atomic_write_json


def load_serving_config(path: Path | None) -> ServingConfig:
    """The ``ServingConfig`` in a JSON or YAML file (defaults without one); a bad or moved key is named."""
    if path is None:
        return ServingConfig()
    # The pipeline config's reader: bounded size, UTF-8 checked, no alias bombs, duplicate keys named.
    text = read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"serving config {path} is not valid JSON: {exc}",
                              "pass a JSON/YAML file of ServingConfig fields") from None
    else:
        data = parse_yaml(text, f"serving config {path}")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"serving config {path} must hold a mapping of ServingConfig fields, not "
                          f"{type(data).__name__}", "write fields such as `port:` and `scheduler:` at the top level")
    return parse_section(ServingConfig, data or {}, f"serving config {path}")


def parse_adapters(values: list[str], cfg: ServingConfig) -> ServingConfig:
    """``cfg`` with the ``--adapter NAME=DIR`` flags added to ``serving.adapters`` (DIR made absolute)."""
    adapters = dict(cfg.adapters)
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise ConfigError(f"--adapter {value!r} is not NAME=DIR",
                              "write --adapter NAME=DIR, e.g. --adapter sql=runs/lora")
        if name in adapters:
            raise ConfigError(f"the adapter name {name!r} is given twice", "give every adapter its own name")
        adapters[name] = str(Path(path).expanduser().resolve())
    return cfg.model_copy(update={"adapters": adapters}) if values else cfg


def api_key_from(flag: str | None, key_file: Path | None) -> str | None:
    """The API key(s) to require: ``--api-key``, else the first line of ``--api-key-file``, else the
    ``LMFORGE_API_KEY`` environment variable (comma-separated for several); None for none.

    A key on the command line shows in the process list; a file or the environment does not."""
    if flag and key_file is not None:
        raise ConfigError("both --api-key and --api-key-file are given", "give the key one way: --api-key-file PATH "
                          "(or LMFORGE_API_KEY), which keeps it out of the process list")
    if flag:
        return flag
    if key_file is not None:
        try:
            lines = Path(key_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the API key file {key_file}: {exc}",
                              "pass --api-key-file a readable UTF-8 file whose first line is the key") from exc
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"the API key file {key_file} is empty", "write the key on its first line")
        return key
    return os.environ.get("LMFORGE_API_KEY") or None


def read_release(path: Path | None) -> dict[str, str] | None:
    """The release the deploy stage wrote for this server (``--release-file``), or None."""
    if path is None:
        return None
    try:
        data = json.loads(read_text(path))
    except ValueError as exc:
        raise ConfigError(f"release file {path} is not valid JSON: {exc}", "deploy again; the stage writes it") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else None


def resolve_model_dir(model: str, ws: Workspace) -> tuple[Path, str]:
    """(local directory, default model name) for a directory or a registry URI ``models:/NAME@ALIAS``."""
    if model.startswith("models:/"):
        from lmforge.tracking.model_uris import resolve_model  # needs MLflow; only registry URIs pay for it

        path, name, _version = resolve_model(model, ws)
        return Path(path), name
    path = Path(model).expanduser().resolve()
    # Checked before torch and the model load: a typo should fail in a fraction of a second.
    if not ((path / "config.json").is_file() or (path / "model.onnx").is_file()):
        reason = "does not exist" if not path.exists() else "holds no config.json"
        raise ServingError(f"{path} is not a model directory (it {reason})",
                           "pass a directory written by training (config.json, model.safetensors, tokenizer files), "
                           "one written by `lmforge export-onnx`, or a registry URI such as models:/NAME@champion")
    return path, path.name


def serve_model(
    model: str,
    cfg: ServingConfig,
    ws: Workspace,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    ready_file: Path | None = None,
    log_level: str = "info",
    release: dict[str, str] | None = None,
) -> None:
    """Serve ``model`` (directory or ``models:/NAME@ALIAS`` in ``ws``) until interrupted.

    ``api_key`` defaults to the ``LMFORGE_API_KEY`` environment variable; ``ready_file`` receives
    ``{"url", "pid"}`` once the server accepts connections.
    """
    model_dir, default_name = resolve_model_dir(model, ws)
    draft = cfg.speculative.draft_model
    if draft:  # speculative decoding's draft model: a directory or a registry URI, resolved like the model
        cfg = updated(cfg, speculative={"draft_model": str(resolve_model_dir(draft, ws)[0])})
    from lmforge.serving.api.launch import run_server  # heavy imports only once arguments are known good

    def ready(url: str) -> None:
        if ready_file is not None:
            atomic_write_json(ready_file, {"url": url, "pid": os.getpid()})

    run_server(model_dir, cfg, model_name or default_name, host=host, port=port,
               api_key=api_key or os.environ.get("LMFORGE_API_KEY") or None, on_ready=ready, log_level=log_level,
               release=release)
