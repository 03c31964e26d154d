"""docker-compose.yml (and docker-compose.gpu.yml), checked offline: Docker cannot run here.

The compose file against the Compose Specification's JSON schema (infra/schemas/compose-spec.json, vendored
from compose-spec/compose-spec, schema/compose-spec.json at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6),
before and after its ``${VAR}`` references are filled from ``.env.example`` as README's ``cp .env.example .env``
makes them; then the rules a schema cannot see: every long-running service has a healthcheck and the others
are one-shots, ``depends_on`` always names a condition, images are pinned (Prefect's server to the installed
client's version), no secret is written in the file, every variable is listed in ``.env.example``; the GPU
override reserves GPUs for training and serving. The services' commands are in test_compose_services.py,
the Dockerfile in test_compose_images.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml
from compose_files import ENV_EXAMPLE, GPU_OVERRIDE, SCHEMA, SECRET_NAME, compose, env_example, interpolate, references
from conftest import REPO
from readme import readme_command

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
