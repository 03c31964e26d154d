"""The container stack's files as the compose tests read them (test_compose.py, test_compose_services.py,
test_compose_images.py): paths, the compose file and ``.env.example`` parsed, compose's ``${VAR}``
interpolation and the variables the files use.
"""

from __future__ import annotations

import re

import yaml
from conftest import REPO

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

