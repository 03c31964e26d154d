"""Start the inference server for one model.

    python -m lmforge.serving MODEL [--host 127.0.0.1] [--port 0] [--model-name NAME]
                                    [--ready-file PATH] [--serving-config PATH] [--adapter NAME=DIR ...]

MODEL is a local model directory or a registry URI ``models:/NAME@ALIAS`` (resolved in the
workspace named by ``LMFORGE_HOME``). ``--ready-file`` receives ``{"url", "pid"}`` once the server
accepts connections (the deploy stage waits for it). ``--serving-config`` is a JSON or YAML file of
``ServingConfig`` fields. ``--adapter NAME=DIR`` (repeatable) serves a LoRA adapter unmerged beside
the base: requests whose ``model`` is NAME use it (``serving.adapters``). API keys, if wanted, come from the ``LMFORGE_API_KEY`` environment
variable (comma-separated for several) rather than a flag, so they never show in the process list.
Binding beyond loopback without a key is refused unless ``allow_unauthenticated_remote`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.workspace import Workspace, atomic_write_json


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmforge.serving", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory or models:/NAME@ALIAS")
    parser.add_argument("--host", default=None, help="bind address (default: serving.host)")
    parser.add_argument("--port", type=int, default=None, help="port; 0 picks a free one (default: serving.port)")
    parser.add_argument("--model-name", default=None,
                        help="name clients send as `model` (default: registry name or directory name)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write {url, pid} here once listening")
    parser.add_argument("--serving-config", type=Path, default=None, help="JSON/YAML file of ServingConfig fields")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve this LoRA adapter beside the base as model NAME (repeatable)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def _load_cfg(path: Path | None) -> ServingConfig:
    import yaml

    if path is None:
        return ServingConfig()
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return ServingConfig.model_validate(data or {})
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot use serving config {path}: {exc}",
                          "pass a JSON/YAML file of ServingConfig fields") from exc


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


def _resolve(model: str, ws: Workspace) -> tuple[Path, str]:
    """(local directory, default model name) for a directory or a registry URI."""
    if model.startswith("models:/"):
        from lmforge.tracking.model_uris import resolve_model  # needs MLflow; only registry URIs pay for it

        path, name, _version = resolve_model(model, ws)
        return Path(path), name
    path = Path(model).expanduser().resolve()
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
) -> None:
    """Serve ``model`` (directory or ``models:/NAME@ALIAS`` in ``ws``) until interrupted.

    ``api_key`` defaults to the ``LMFORGE_API_KEY`` environment variable; ``ready_file`` receives
    ``{"url", "pid"}`` once the server accepts connections.
    """
    from lmforge.serving.launch import run_server  # heavy imports only once arguments are known good

    model_dir, default_name = _resolve(model, ws)

    def ready(url: str) -> None:
        if ready_file is not None:
            atomic_write_json(ready_file, {"url": url, "pid": os.getpid()})

    run_server(model_dir, cfg, model_name or default_name, host=host, port=port,
               api_key=api_key or os.environ.get("LMFORGE_API_KEY") or None, on_ready=ready, log_level=log_level)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = parse_adapters(args.adapter, _load_cfg(args.serving_config))
        serve_model(args.model, cfg, Workspace.from_env(), host=args.host, port=args.port,
                    model_name=args.model_name, ready_file=args.ready_file, log_level=args.log_level)
    except LmforgeError as exc:
        print(f"error: {exc.cause}\nfix: {exc.fix}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
