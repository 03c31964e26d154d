"""Start the inference server for one model.

    python -m lmforge.serving MODEL [--host 127.0.0.1] [--port 0] [--model-name NAME]
                                    [--ready-file PATH] [--serving-config PATH] [--adapter NAME=DIR ...]
                                    [--api-key-file PATH] [--release-file PATH]

MODEL is a local model directory or a registry URI ``models:/NAME@ALIAS`` (resolved in the
workspace named by ``LMFORGE_HOME``). ``--ready-file`` receives ``{"url", "pid"}`` once the server
accepts connections (the deploy stage waits for it). ``--serving-config`` is a JSON or YAML file of
``ServingConfig`` fields. ``--adapter NAME=DIR`` (repeatable) serves a LoRA adapter unmerged beside
the base: requests whose ``model`` is NAME use it (``serving.adapters``). API keys, if wanted, come
from the ``LMFORGE_API_KEY`` environment variable (comma-separated for several) or the first line of
``--api-key-file PATH`` rather than a flag, so they never show in the process list. Binding beyond
loopback without a key is refused unless ``serving.server.allow_unauthenticated_remote`` is set. The
work is done by ``serving/api/`` (``serve.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.core.errors import LmforgeError
from lmforge.core.workspace import Workspace
from lmforge.serving.api import api_key_from, load_serving_config, parse_adapters, read_release, serve_model


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmforge.serving", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory or models:/NAME@ALIAS")
    parser.add_argument("--host", default=None, help="bind address (default: serving.server.host)")
    parser.add_argument("--port", type=int, default=None,
                        help="port; 0 picks a free one (default: serving.server.port)")
    parser.add_argument("--model-name", default=None,
                        help="name clients send as `model` (default: registry name or directory name)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write {url, pid} here once listening")
    parser.add_argument("--serving-config", type=Path, default=None, help="JSON/YAML file of ServingConfig fields")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve this LoRA adapter beside the base as model NAME (repeatable)")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                        help="require the Bearer token on this file's first line (default: LMFORGE_API_KEY)")
    parser.add_argument("--release-file", type=Path, default=None, metavar="PATH",
                        help="JSON of what the deploy stage serves (registered name, version, alias, run id), "
                             "reported by /health and /v1/models")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = parse_adapters(args.adapter, load_serving_config(args.serving_config))
        serve_model(args.model, cfg, Workspace.from_env(), host=args.host, port=args.port,
                    api_key=api_key_from(None, args.api_key_file), model_name=args.model_name,
                    ready_file=args.ready_file, log_level=args.log_level, release=read_release(args.release_file))
    except LmforgeError as exc:
        print(f"error: {exc.cause}\nfix: {exc.fix}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
