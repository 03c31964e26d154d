"""The compose services' commands: each service of ours runs the command ``lmforge stack`` runs for the same
role (lmforge.stack.roles); ``docker compose config`` accepts the files where the compose plugin exists; the
healthcheck and Ray-join scripts run for real; and (slow tier) the mlflow and prefect-server services'
commands and environments run as processes against a real PostgreSQL and S3 server.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from compose_files import COMPOSE, ENV_EXAMPLE, GPU_OVERRIDE, compose, env_example, interpolate
from conftest import REPO, free_port, wait_http
from fixtures.collect.s3 import client, s3_server

from lmforge.cli import build_parser
from lmforge.config import PipelineConfig
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace
from lmforge.serving.api.launch import check_exposure, parse_keys
from lmforge.stack import roles

# ---------------------------------------------------------------- the same commands as `lmforge stack`

# Flags whose values are the form's own (host, ports, paths, the backing store); the flag itself must match.
OWN_VALUES = {"--host", "--port", "--backend-store-uri", "--artifacts-destination"}
# Only the process form: loopback address, its temp dir (Ray's sockets, `down`'s marker) and the free ports it
# picks so two stacks of one machine never collide; a container has its own address, disk and ports.
PROCESS_ONLY = {"--node-ip-address", "--temp-dir", "--ray-client-server-port", "--node-manager-port",
                "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--num-cpus"}
# Only the container form: `ray start` stays in the foreground as the container's main process (the process
# form lets it return and records the node's process group instead).
CONTAINER_ONLY = {"--block"}


def normalized(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """(program and positionals, flags → value) with the program's directory dropped, ``--f=v`` as ``--f v``."""
    words, flags = [Path(argv[0]).name], {}
    rest = list(argv[1:])
    while rest:
        word = rest.pop(0)
        if not word.startswith("--"):
            words.append(word)
            continue
        name, eq, value = word.partition("=")
        if not eq and rest and not rest[0].startswith("--"):
            value = rest.pop(0)
        flags[name] = value if (eq or value) else None
    return words, flags


def assert_same_role(container: list[str], process: list[str]) -> None:
    c_words, c_flags = normalized(container)
    p_words, p_flags = normalized(process)
    assert c_words == p_words
    p_flags = {k: v for k, v in p_flags.items() if k not in PROCESS_ONLY}
    c_flags = {k: v for k, v in c_flags.items() if k not in CONTAINER_ONLY}
    assert set(c_flags) == set(p_flags), (sorted(c_flags), sorted(p_flags))
    assert {k: v for k, v in c_flags.items() if k not in OWN_VALUES} == {
        k: v for k, v in p_flags.items() if k not in OWN_VALUES}


def test_each_service_runs_the_command_lmforge_stack_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token")
    services = interpolate(compose(), env_example())["services"]
    ws = Workspace(tmp_path / "home")
    # The compose stack keeps MLflow's artifacts on its store, as `lmforge stack up` does with this setting.
    config = PipelineConfig.model_validate({"platform": {"mlflow_artifacts": "s3://mlflow/artifacts"}})
    api = "http://127.0.0.1:4200/api"
    local = {
        "prefect-server": roles.prefect_server(ws, 4200).command,
        "mlflow": roles.mlflow_server(ws, config, 5000, "postgresql://db/mlflow").command,
        "ray-head": roles.ray_head(ws, 6379, list(range(7000, 7007)), None).command,
        "prefect-worker": roles.prefect_worker(ws, api, "http://127.0.0.1:5000", None).command,
    }
    for role, process in local.items():
        assert_same_role(services[role]["command"], process)
    worker = services["ray-worker"]["command"]
    head = services["ray-head"]["command"]
    assert worker[:2] == head[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker
    assert "--block" in worker and "--disable-usage-stats" in worker
    # The worker's environment points at the stack as the process form's does, by service name.
    env = services["prefect-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api" and env["RAY_ADDRESS"] == "ray-head:6379"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["RAY_AUTH_MODE"] == "token"
    assert all(services[name]["environment"]["RAY_AUTH_TOKEN"] == "CHANGE_ME"
               for name in ("ray-head", "ray-worker", "prefect-worker"))


def test_serve_binds_every_interface_through_an_api_key():
    """The old compose set LMFORGE_ALLOW_PUBLIC_BIND, which no code reads: the server refused 0.0.0.0 and the
    service restart-looped. lmforge serves beyond loopback with an API key (LMFORGE_API_KEY)."""
    serve = interpolate(compose(), env_example())["services"]["serve"]
    assert "LMFORGE_ALLOW_PUBLIC_BIND" not in COMPOSE.read_text()
    args = build_parser().parse_args(serve["command"][1:])
    assert args.command == "serve" and args.model == "models:/lmforge-demo@champion" and args.host == "0.0.0.0"
    check_exposure(args.host, parse_keys(serve["environment"]["LMFORGE_API_KEY"]), ServingConfig())
    with pytest.raises(ServingError):
        check_exposure(args.host, parse_keys(None), ServingConfig())
    # The health URL its probe asks is the server's unauthenticated /health on its --port.
    assert serve["healthcheck"]["test"][-1] == f"http://127.0.0.1:{args.port}/health"


def test_postgres_init_creates_mlflows_database():
    services = compose()["services"]
    init = (REPO / "docker" / "postgres-init.sql").read_text()
    mlflow_db = next(w for w in services["mlflow"]["command"] if w.startswith("postgresql")).rsplit("/", 1)[1]
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {mlflow_db};" in init and services["postgres"]["environment"]["POSTGRES_DB"] == prefect_db
    assert any(volume.startswith("./docker/postgres-init.sql:/docker-entrypoint-initdb.d/")
               for volume in services["postgres"]["volumes"])


def test_docker_compose_config_accepts_the_file(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here; the schema test validates the file offline")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU_OVERRIDE)]):
        result = subprocess.run([docker, "compose", *files, "--env-file", str(tmp_path / ".env"), "config",
                                 "--quiet"], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the scripts the services run


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_script_probes_for_real():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    probe = [sys.executable, str(REPO / "docker" / "healthcheck.py")]
    try:
        assert subprocess.run([*probe, "http", f"http://127.0.0.1:{port}/health"]).returncode == 0
        assert subprocess.run([*probe, "http", f"http://127.0.0.1:{port}/other"]).returncode == 1
        assert subprocess.run([*probe, "tcp", str(port)]).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    assert subprocess.run([*probe, "tcp", str(port)]).returncode == 1
    # No Prefect server there: the worker is not online.
    assert subprocess.run([*probe, "prefect-worker", f"http://127.0.0.1:{port}/api"]).returncode == 1


def test_join_ray_needs_the_head_address():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(["sh", str(REPO / "docker" / "join-ray.sh"), "true"], env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "RAY_ADDRESS names the Ray head" in result.stderr


# ---------------------------------------------------------------- the services' commands, run as processes


@contextmanager
def postgres(user: str, password: str) -> Iterator[int]:
    """A real PostgreSQL on a loopback port, set up as the postgres image sets up the compose service:
    POSTGRES_USER with a password, POSTGRES_DB, then docker/postgres-init.sql. Runs as ``nobody`` when this
    process is root (PostgreSQL refuses root), in a short directory of /tmp that user can reach (pytest's
    are private to root; the server's unix socket path must stay under 107 bytes)."""
    bins = {name: shutil.which(name) for name in ("initdb", "pg_ctl", "psql")}
    if not all(bins.values()):
        pytest.skip(f"PostgreSQL's programs are not installed here ({', '.join(n for n, b in bins.items() if not b)})")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="lmf-pg-"))
    (root / "pw").write_text(password)
    if as_user:
        shutil.chown(root, "nobody")
        shutil.chown(root / "pw", "nobody")
    port = free_port()
    data = root / "data"
    try:
        for step in ([bins["initdb"], "-D", str(data), "-U", user, f"--pwfile={root / 'pw'}", "-A", "scram-sha-256"],
                     [bins["pg_ctl"], "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                      f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]):
            done = subprocess.run([*as_user, *step], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
        psql = [bins["psql"], "-h", "127.0.0.1", "-p", str(port), "-U", user, "-v", "ON_ERROR_STOP=1", "-q"]
        env = dict(os.environ, PGPASSWORD=password)
        postgres_db = compose()["services"]["postgres"]["environment"]["POSTGRES_DB"]
        subprocess.run([*psql, "-d", "postgres", "-c", f"CREATE DATABASE {postgres_db};"], env=env, check=True)
        subprocess.run([*psql, "-d", "postgres", "-f", str(REPO / "docker" / "postgres-init.sql")], env=env, check=True)
        yield port
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, bins["pg_ctl"], "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def as_process(service: dict, addresses: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    """A compose service's command and environment for this machine: the other services' ``name:port`` as
    ``addresses`` says, loopback for 0.0.0.0, ``port`` for its --port, the programs of this environment."""

    def here(text: str) -> str:
        for address, local in addresses.items():
            text = text.replace(address, local)
        return text

    argv = [here(word) for word in service["command"]]
    argv[0] = str(Path(sys.executable).with_name(argv[0]))
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    return argv, {**os.environ, **{key: here(str(value)) for key, value in service["environment"].items()}}


# MLflow's and Prefect's first start on an empty PostgreSQL runs every schema migration: 25-40 s on the shared
# 2-core machine, so the slow tier (`make test-slow`), as tests/integration/test_stack.py's process stack.
@pytest.mark.slow
def test_mlflow_and_prefect_services_run_on_postgresql_and_s3(tmp_path):
    """The compose file's MLflow and Prefect server commands, with their environments, against a real
    PostgreSQL made as the compose file makes it and an S3 server: both start healthy, Prefect's tables and
    MLflow's runs land in their databases, an artifact logged through MLflow lands in the bucket."""
    services = interpolate(compose(), env_example())["services"]
    user, password = services["postgres"]["environment"]["POSTGRES_USER"], services["postgres"]["environment"][
        "POSTGRES_PASSWORD"]
    procs = []
    with postgres(user, password) as pg_port, s3_server() as endpoint:
        client(endpoint).create_bucket(Bucket="mlflow")
        addresses = {"postgres:5432": f"127.0.0.1:{pg_port}", "http://minio:9000": endpoint}
        ports = {"mlflow": free_port(), "prefect-server": free_port()}
        try:
            for name, port in ports.items():
                argv, env = as_process(services[name], addresses, port)
                env["PREFECT_HOME"] = str(tmp_path / "prefect")
                if name == "mlflow":  # the Host header a client of this port sends (compose's: 127.0.0.1:5000)
                    env["MLFLOW_SERVER_ALLOWED_HOSTS"] += f",127.0.0.1:{port}"
                procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            wait_http(f"http://127.0.0.1:{ports['mlflow']}/health", 120, procs[0])
            wait_http(f"http://127.0.0.1:{ports['prefect-server']}/api/health", 120, procs[1])
            (tmp_path / "note.txt").write_text("stored on S3 through the server")
            logged = subprocess.run(
                [sys.executable, "-c", "import mlflow\nwith mlflow.start_run():\n    mlflow.log_artifact('note.txt')"],
                cwd=tmp_path, env=dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{ports['mlflow']}"),
                capture_output=True, text=True)
            assert logged.returncode == 0, logged.stderr[-2000:]
            keys = [o["Key"] for o in client(endpoint).list_objects_v2(Bucket="mlflow")["Contents"]]
            assert any(key.startswith("artifacts/") and key.endswith("/note.txt") for key in keys), keys
            psql = ["psql", "-h", "127.0.0.1", "-p", str(pg_port), "-U", user, "-tAc"]
            count = partial(subprocess.check_output, env=dict(os.environ, PGPASSWORD=password), text=True)
            assert int(count([*psql, "select count(*) from runs", "-d", "mlflow"])) == 1
            assert int(count([*psql, "select count(*) from flow", "-d", "prefect"])) == 0  # its schema, migrated
        finally:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
