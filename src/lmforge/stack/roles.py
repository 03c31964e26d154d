"""The roles of the local stack: the command each runs, where it listens, and how it shows it is healthy.

The same roles as the container stack, as processes of this machine: a Prefect server (SQLite under the
workspace's ``prefect/``, or ``PREFECT_API_DATABASE_CONNECTION_URL``), a Prefect worker on the process work
pool ``lmforge`` (flow runs it picks up report to this stack's MLflow and Ray), an MLflow server (the
workspace's SQLite, or the database URI given; artifacts as :func:`artifact_flags` says), a Ray head (its
own temp dir, so it never meets another Ray of this machine) and, with ``--s3``, moto's S3-compatible
server. The servers listen on loopback only; Ray's GCS listens on every interface whatever the node's
address, so the head runs with Ray's token authentication (:func:`ray_auth_mode`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from lmforge.config import PipelineConfig
from lmforge.core.errors import OrchestrationError
from lmforge.core.workspace import Workspace
from lmforge.stack.processes import Record, http_ok, tcp_open

POOL = "lmforge"
WORKER = "lmforge-stack"
# The order roles start in; `down` stops them in reverse (the worker first, the Prefect server last).
ORDER = ("prefect-server", "mlflow", "ray-head", "s3", "prefect-worker")
# Seconds between SIGTERM and SIGKILL. A Ray head's GCS and raylet take 20 s and more to exit on SIGTERM,
# and its state (the temp dir's sessions) is thrown away anyway: a short grace.
GRACE_S = {"ray-head": 3.0}


@dataclass(frozen=True)
class Options:
    """What `lmforge stack up` was asked for. A port of 0 means a free one."""

    prefect_port: int = 4200
    mlflow_port: int = 5000
    ray_port: int = 6379
    s3_port: int = 9000
    s3: bool = False
    mlflow_db: str | None = None
    ray_cpus: int | None = None
    timeout: float = 180
    # `lmforge ui`: only these roles, stopped with the process that started them.
    roles: tuple[str, ...] = ("prefect-server", "mlflow", "ray-head", "prefect-worker")
    tied: bool = False

    def wanted(self) -> list[str]:
        return [role for role in ORDER if role in self.roles or (role == "s3" and self.s3)]


@dataclass(frozen=True)
class Spec:
    """One role to start: its command, environment and the facts its record keeps."""

    role: str
    command: list[str]
    env: dict[str, str]
    port: int
    url: str
    marker: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # `ray start --head` returns once the node is up, leaving the node's processes in its group.
    exits_when_up: bool = False


def stack_dir(ws: Workspace) -> Path:
    return ws.home / "stack"


def bin_path(name: str) -> str:
    """The console script installed beside this interpreter (the project's venv)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def prefect_server(ws: Workspace, port: int) -> Spec:
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(ws.prefect_dir), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=url)
    env.pop("PREFECT_API_URL", None)
    return Spec("prefect-server", [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env, port, url)


def prefect_worker(ws: Workspace, api: str, mlflow_url: str | None, ray: Record | None) -> Spec:
    """The worker runs deployments' flow runs as subprocesses: they get this stack's services."""
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(ws.prefect_dir), LMFORGE_HOME=ws.location)
    if mlflow_url:
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    if ray is not None:
        env.update(RAY_ADDRESS=ray.url, RAY_AUTH_MODE=ray.extra["auth_mode"])
    command = [bin_path("prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", WORKER]
    return Spec("prefect-worker", command, env, 0, api, extra={"api": api, "pool": POOL})


def mlflow_backend(ws: Workspace, config: PipelineConfig, given: str | None) -> str:
    """The server's own store: the URI given, else platform.mlflow_tracking_uri when it names a database (an
    ``http(s)://`` one is a server to use, not a store to serve), else the workspace's SQLite file."""
    configured = config.platform.mlflow_tracking_uri
    if given:
        return given
    if configured and urlparse(configured).scheme not in ("http", "https"):
        return configured
    ws.mlflow_dir.mkdir(parents=True, exist_ok=True)
    return ws.mlflow_tracking_uri


def artifact_flags(ws: Workspace, config: PipelineConfig) -> list[str]:
    """Artifacts on a store (platform.mlflow_artifacts, or an object-store workspace) are served by
    the server (``mlflow-artifacts:/`` URIs), so a client on another machine needs only the server's
    URL, not the store's credentials; the server reads them from its environment's standard chain.
    A local workspace keeps its artifact directory, which clients read directly."""
    from lmforge.tracking.mlflow_tracker import artifacts_destination

    destination = artifacts_destination(ws, config.platform)
    if destination == ws.mlflow_artifacts_uri:
        return ["--default-artifact-root", destination, "--no-serve-artifacts"]
    return ["--artifacts-destination", destination, "--serve-artifacts"]


def mlflow_server(ws: Workspace, config: PipelineConfig, port: int, db: str | None) -> Spec:
    command = [bin_path("mlflow"), "server", "--backend-store-uri", mlflow_backend(ws, config, db),
               *artifact_flags(ws, config), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return Spec("mlflow", command, dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"), port, f"http://127.0.0.1:{port}")


def ray_head(ws: Workspace, port: int, ports: list[int], cpus: int | None) -> Spec:
    """``ports``: the node's other listening ports (client server, node manager, object manager, metrics,
    dashboard agent x2, runtime env agent), free ones, so two stacks (or tests) on a machine never collide."""
    # A short temp dir of this workspace's own: Ray's unix sockets live under it (paths under 107 bytes),
    # and it is the marker by which `down` finds this head's processes and no other Ray's.
    temp_dir = Path(tempfile.gettempdir()) / f"lmf-ray-{hashlib.sha256(str(ws.home).encode()).hexdigest()[:10]}"
    flags = ("--ray-client-server-port", "--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    command = [bin_path("ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
               f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
               *(f"{flag}={value}" for flag, value in zip(flags, ports, strict=True)),
               *([f"--num-cpus={cpus}"] if cpus is not None else [])]
    mode = ray_auth_mode()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": mode}
    return Spec("ray-head", command, env, port, f"127.0.0.1:{port}", marker=str(temp_dir),
                extra={"temp_dir": str(temp_dir), "auth_mode": mode}, exits_when_up=True)


def ray_auth_mode() -> str:
    """``token`` unless the user set RAY_AUTH_MODE; a token must then exist where Ray reads it (clients need
    the same mode and token: `lmforge stack up` prints the mode, the worker gets it)."""
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    has_token = os.environ.get("RAY_AUTH_TOKEN") or Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()
    if mode == "token" and not has_token:
        raise OrchestrationError("the stack's Ray head needs an authentication token, and none exists (its GCS "
                                 "listens on every interface)",
                                 "run `ray get-auth-token --generate` once (it writes ~/.ray/auth_token), or set "
                                 "RAY_AUTH_MODE=disabled to run the head without authentication")
    return mode


def s3_server(port: int) -> Spec:
    command = bin_path("moto_server")
    if shutil.which(command) is None:
        raise OrchestrationError("--s3 needs moto's S3-compatible server (moto_server), which is not installed",
                                 "pip install 'moto[server]' (the test extra has it), or leave out --s3")
    return Spec("s3", [command, "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), port,
                f"http://127.0.0.1:{port}")


def healthy(record: Record) -> bool:
    """Whether a running role answers as it should (its process group is alive: checked by the caller)."""
    if record.role in ("prefect-server", "mlflow"):
        return http_ok(f"{record.url}/health")
    if record.role == "s3":
        return http_ok(record.url)
    if record.role == "ray-head":
        return tcp_open(record.port)
    if record.role == "prefect-worker":
        return worker_online(record.extra["api"], record.extra["pool"])
    return False


def worker_online(api: str, pool: str) -> bool:
    """The pool exists and a worker of ours sent its heartbeat to it."""
    import httpx

    try:
        reply = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200 and any(
        worker.get("name") == WORKER and worker.get("status") == "ONLINE" for worker in reply.json())
