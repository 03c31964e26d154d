"""The arguments of ``lmforge stack up | down | status`` and what each prints (cli.py hands them here, so
the command line keeps one line per command)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lmforge.config import PipelineConfig
from lmforge.core.report import emit
from lmforge.core.workspace import Workspace


def add_stack_parser(sub: Any, handler: Callable[[argparse.Namespace], None]) -> None:
    """``sub``: the subparsers of the ``lmforge`` parser."""
    stack = sub.add_parser("stack", help="start, stop or show the platform's services as local processes")
    stack_sub = stack.add_subparsers(dest="stack_command", required=True)
    up = stack_sub.add_parser("up", help="start the Prefect server and worker, MLflow and a Ray head (--s3: and an "
                              "S3-compatible server); wait until healthy; print their URLs")
    up.add_argument("--config", help="pipeline config YAML (its platform section: MLflow's store and artifacts)")
    for role, default in (("prefect", 4200), ("mlflow", 5000), ("ray", 6379), ("s3", 9000)):
        up.add_argument(f"--{role}-port", type=int, default=default, help=f"default {default}; 0: a free port")
    up.add_argument("--s3", action="store_true", help="also start an S3-compatible server (moto_server)")
    up.add_argument("--mlflow-db", metavar="URI",
                    help="MLflow's database (default: platform.mlflow_tracking_uri if a database, else the "
                    "workspace's SQLite)")
    up.add_argument("--ray-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    up.add_argument("--timeout", type=float, default=180, help="seconds each role may take to become healthy")
    deploy = stack_sub.add_parser("deploy", help="register the pipeline, retrain, tune, deploy and collect-watch "
                                  "deployments on the stack's work pool (again: updates them, never doubles)")
    deploy.add_argument("--config", help="pipeline config YAML: the deployments' parameters, and the platform "
                        "section's schedule_cron, retrain_on_new_data, watch_interval_s, retrain_debounce_s")
    stack_sub.add_parser("down", help="stop every role of the stack; no process is left")
    stack_sub.add_parser("status", help="each role: running, unhealthy or stopped, its pid and URL")
    for parser in stack_sub.choices.values():
        parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
        parser.set_defaults(handler=handler)


def run_stack(args: argparse.Namespace, config: PipelineConfig, ws: Workspace) -> None:
    from lmforge.stack import control, summary
    from lmforge.stack.roles import Options

    if args.stack_command == "down":
        emit("lmforge stack down", {"stopped": control.down(ws)}, args.json)
        return
    if args.stack_command == "up":
        options = Options(prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, ray_port=args.ray_port,
                          s3_port=args.s3_port, s3=args.s3, mlflow_db=args.mlflow_db, ray_cpus=args.ray_cpus,
                          timeout=args.timeout)
        states, started = control.up(ws, config, options)
        facts = summary(states, started)
    else:
        facts = summary(control.status(ws))
    if args.json:
        emit(f"lmforge stack {args.stack_command}", facts, True)
        return
    # One line per role, then the variables a client sets, ready to paste into a shell.
    for role, state in facts["roles"].items():
        started_now = " (started now)" if role in facts.get("started", ()) else ""
        print(f"{role:15} {state['state']:9} {state['url'] or '':32} pid {state['pid'] or '-'}{started_now}")
    for name, value in facts["env"].items():
        print(f"export {name}={value}")
    if "prefect_ui" in facts:
        print(f"Prefect UI: {facts['prefect_ui']}   logs: {ws.home / 'stack' / 'logs'}")
