"""Static checks of what cannot run here: Docker images and the compose stack (no Docker engine
on CI), plus the README's promises about its two commands."""

from __future__ import annotations

import re
import shlex

import yaml
from conftest import REPO

from lmforge.cli import build_parser


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_are_complete():
    services = _compose()["services"]
    assert {"prefect", "mlflow", "ray-head", "worker", "serve"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in _compose()["volumes"], vol


def test_compose_lmforge_commands_parse_with_our_cli():
    parser = build_parser()
    for name, svc in _compose()["services"].items():
        entry = svc.get("entrypoint")
        if "build" in svc and entry is None and svc.get("command"):
            args = parser.parse_args(svc["command"])  # raises SystemExit on a bad command
            assert args.handler is not None, name


def test_dockerfile_copies_existing_paths():
    text = (REPO / "docker" / "Dockerfile").read_text()
    sources = [src for line in text.splitlines() if line.startswith("COPY")
               for src in shlex.split(line)[1:-1]]
    assert sources, "Dockerfile copies nothing"
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "USER lmforge" in text  # never run the server as root


def test_readme_names_the_two_commands_and_ci_calls_make_test():
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "torch==2.13.0" in makefile


def test_every_engine_package_is_in_the_distribution():
    """A package missing from the distribution works in the editable dev install but not in the image.

    pyproject finds packages by their ``__init__.py``; a folder of modules without one is left out.
    """
    import tomllib

    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "lmforge*" in found["include"] and {"flows", "tasks"} <= set(found["include"])
    for module in (REPO / "src").rglob("*.py"):
        package = ".".join(module.parent.relative_to(REPO / "src").parts)
        assert (module.parent / "__init__.py").exists(), f"{package} has no __init__.py, so no wheel holds it"
