"""``lmforge stack up | down | status``: the platform's roles as local processes, for machines without
Docker and for tests.

``up`` starts what is not running yet (a running, healthy role is reported, not doubled), waits until every
role is healthy and returns their URLs; a role that fails stops what this ``up`` started. ``status`` reports
each role as running, unhealthy or stopped. ``down`` stops every role, worker first, and leaves no process
(nor a record of a Serve application that died with the Ray head: its model version is tagged retired).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lmforge.config import PipelineConfig
from lmforge.core.errors import OrchestrationError
from lmforge.core.workspace import Workspace
from lmforge.stack import processes, roles
from lmforge.stack.processes import Record
from lmforge.stack.roles import ORDER, Options, Spec


@dataclass(frozen=True)
class RoleState:
    role: str
    state: str  # running | unhealthy | stopped
    pid: int | None = None
    url: str | None = None
    log: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "pid": self.pid, "url": self.url, "log": self.log}


def record_path(ws: Workspace, role: str) -> Path:
    return roles.stack_dir(ws) / f"{role}.json"


def role_state(ws: Workspace, role: str) -> RoleState:
    record = processes.load(record_path(ws, role))
    if record is None or not processes.group_alive(record.pgid):
        return RoleState(role, "stopped")
    state = "running" if roles.healthy(record) else "unhealthy"
    return RoleState(role, state, record.pid, record.url, record.log, record.extra)


def status(ws: Workspace) -> dict[str, RoleState]:
    return {role: role_state(ws, role) for role in ORDER}


def prefect_api(ws: Workspace) -> str:
    """The Prefect API that `lmforge stack deploy` registers on: this stack's server when it runs, else
    PREFECT_API_URL (a server started otherwise, such as the compose stack's)."""
    state = role_state(ws, "prefect-server")
    if state.state == "running" and state.url:
        return state.url
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    raise OrchestrationError(f"no Prefect server to register deployments on (the stack's is {state.state}, and "
                             "PREFECT_API_URL is not set)",
                             "start the stack with `lmforge stack up` (same LMFORGE_HOME), or set PREFECT_API_URL "
                             "to a running Prefect server")


def up(ws: Workspace, config: PipelineConfig, options: Options) -> tuple[dict[str, RoleState], list[str]]:
    """Start the wanted roles that are not running; returns every wanted role's state and those started now."""
    wanted = options.wanted()
    running = {role: processes.load(record_path(ws, role)) for role in wanted
               if role_state(ws, role).state != "stopped"}
    for role, record in running.items():
        if record is not None and not roles.healthy(record):
            raise OrchestrationError(f"the stack's {role} is running (pid {record.pid}) but does not answer",
                                     f"read its log, {record.log}; then `lmforge stack down` and `lmforge stack up`")
    started: list[Record] = []
    try:
        first = [spec for spec in _specs(ws, config, options, running, wanted) if spec.role != "prefect-worker"]
        started += _start_all(ws, first, options)
        if "prefect-worker" in wanted and "prefect-worker" not in running:
            records = {r.role: r for r in [*started, *(r for r in running.values() if r)]}
            worker = roles.prefect_worker(ws, records["prefect-server"].url,
                                          records["mlflow"].url if "mlflow" in records else None,
                                          records.get("ray-head"))
            started += _start_all(ws, [worker], options)
    except BaseException:
        for record in reversed(started):
            _stop_role(ws, record)
        raise
    return {role: role_state(ws, role) for role in wanted}, [r.role for r in started]


def down(ws: Workspace, only: tuple[str, ...] = ORDER) -> list[str]:
    """Stop the roles (all by default), the worker first; returns those that were running.

    The Serve application deployed on this stack's Ray head (``serving.platform: ray``) stops with the head:
    its record goes and its model version is tagged retired, while the stack's MLflow still runs (it stops
    after the head)."""
    stopped: list[str] = []
    untagged: OrchestrationError | None = None
    for role in reversed(ORDER):
        record = processes.load(record_path(ws, role))
        if role not in only or record is None:
            continue
        if processes.group_alive(record.pgid):
            stopped.append(role)
        _stop_role(ws, record)
        if role == "ray-head":
            try:
                _retire_serve_app(ws, record)
            except OrchestrationError as exc:  # the other roles still stop; the failure is raised once they have
                untagged = exc
    if untagged is not None:
        raise untagged
    return stopped


def _retire_serve_app(ws: Workspace, head: Record) -> None:
    """Forget the Serve application recorded on ``head`` (a later deploy or rollback must not take it for
    running) and tag its model version retired, in the stack's MLflow when it runs, else the workspace's."""
    path = ws.serve_app_record  # written by serving/ray_serve (which asks this module for the head: no import back)
    app = json.loads(path.read_text()) if path.exists() else None
    if app is None or app["app"]["address"] != head.url:  # none, or on another cluster: not this head's to end
        return
    path.unlink()
    if not app["release"].get("registered_name"):
        return  # a model directory: no registry version to tag
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lmforge.tracking.deployment import mark_retired
    from lmforge.tracking.mlflow_tracker import mlflow_client

    mlflow = role_state(ws, "mlflow")
    client = MlflowClient(mlflow.url, mlflow.url) if mlflow.state == "running" and mlflow.url else mlflow_client(ws)
    name, version = app["release"]["registered_name"], app["release"]["version"]
    try:
        mark_retired(client, name, version)
    except (MlflowException, OSError) as exc:
        raise OrchestrationError(f"the stack stopped, but {name} version {version} (served on its Ray head) could "
                                 f"not be tagged retired in MLflow at {client.tracking_uri}: {exc}",
                                 "check that MLflow store, then tag the version lmforge.deploy.retired_at yourself "
                                 "(the Serve application is gone with the head)") from exc


def _stop_role(ws: Workspace, record: Record) -> None:
    processes.stop(record, roles.GRACE_S.get(record.role, 15))
    if record.extra.get("temp_dir"):  # the Ray head's sessions and sockets: of no use once it stopped
        shutil.rmtree(record.extra["temp_dir"], ignore_errors=True)
    record_path(ws, record.role).unlink(missing_ok=True)


def _specs(ws: Workspace, config: PipelineConfig, options: Options, running: dict[str, Record | None],
           wanted: list[str]) -> list[Spec]:
    """Specs of the wanted roles not running yet, on their configured (or free) ports."""
    todo = [role for role in wanted if role not in running]
    specs = []
    if "prefect-server" in todo:
        specs.append(roles.prefect_server(ws, processes.port_or_free(options.prefect_port, "--prefect-port")))
    if "mlflow" in todo:
        specs.append(roles.mlflow_server(ws, config, processes.port_or_free(options.mlflow_port, "--mlflow-port"),
                                         options.mlflow_db))
    if "ray-head" in todo:
        port = processes.port_or_free(options.ray_port, "--ray-port")
        specs.append(roles.ray_head(ws, port, [processes.free_port() for _ in range(7)], options.ray_cpus))
    if "s3" in todo:
        specs.append(roles.s3_server(processes.port_or_free(options.s3_port, "--s3-port")))
    if "prefect-worker" in todo and "prefect-server" not in wanted:
        raise OrchestrationError("the Prefect worker needs the stack's Prefect server",
                                 "start both (the default roles of `lmforge stack up`)")
    return specs


def _start_all(ws: Workspace, specs: list[Spec], options: Options) -> list[Record]:
    """Launch every spec at once (they start in parallel), then wait for each to be healthy and record it."""
    logs = roles.stack_dir(ws) / "logs"
    launched = [(spec, processes.launch(spec.command, logs / f"{spec.role}.log", spec.env, options.tied))
                for spec in specs]
    records: list[Record] = []
    try:
        for spec, proc in launched:
            record = Record(spec.role, proc.pid, proc.pid, spec.port, spec.url, str(logs / f"{spec.role}.log"),
                            spec.command, spec.marker, spec.extra)
            if spec.exits_when_up:
                _wait_exit(proc, spec, Path(record.log), options.timeout)
            processes.wait_until(partial(roles.healthy, record), None if spec.exits_when_up else proc,
                                 spec.role, Path(record.log), options.timeout)
            processes.save(record_path(ws, spec.role), record)
            records.append(record)
    except BaseException:
        done = {r.role for r in records}
        for spec, proc in launched:  # the ones not recorded yet, as if they were
            if spec.role not in done:
                _stop_role(ws, Record(spec.role, proc.pid, proc.pid, spec.port, spec.url, "", spec.command,
                                      spec.marker, spec.extra))
        for record in records:
            _stop_role(ws, record)
        raise
    return records


def _wait_exit(proc: subprocess.Popen, spec: Spec, log: Path, timeout: float) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OrchestrationError(f"{spec.role} did not come up within {timeout:.0f} s",
                                 f"read its log, {log}: {processes.tail(log)}") from None
    if code != 0:
        raise OrchestrationError(f"{spec.role} exited with code {code} while starting",
                                 f"read its log, {log}: {processes.tail(log)}")
