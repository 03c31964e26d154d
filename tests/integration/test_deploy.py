"""The deploy stage: a real detached server process for a local model directory, probed and stopped."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_model_dir

from lmforge.config.serving import ServerConfig, ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace
from lmforge.stages.deploy import deploy, read_deployment, stop

CFG = ServingConfig(max_new_tokens=8, server=ServerConfig(startup_timeout_s=90),
                    probe_prompt="What does `json.dumps` do?")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_deploy_probes_records_redeploys_and_stops(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "model")
    ws = Workspace(tmp_path / "home")
    try:
        first = deploy(CFG, str(model_dir), ws, "tiny")
        assert first.endpoint.startswith("http://127.0.0.1:") and first.model_name == "tiny"
        assert first.probe_prompt == CFG.probe_prompt and isinstance(first.probe_response, str)
        assert first.latency_s > 0 and first.as_dict()["pid"] == first.pid
        assert _running(first.pid)  # it outlives deploy(): it is the deployment
        assert read_deployment(ws)["pid"] == first.pid and read_deployment(ws)["endpoint"] == first.endpoint
        assert httpx.get(f"{first.endpoint}/v1/models").json()["data"][0]["id"] == "tiny"
        assert "lmforge-serve listening on" in (ws.serving_dir / "server.log").read_text()

        second = deploy(CFG, str(model_dir), ws, "tiny")  # replaces the first
        assert second.pid != first.pid and not _running(first.pid) and _running(second.pid)
    finally:
        stopped = stop(ws)
    assert stopped and not _running(second.pid)
    assert read_deployment(ws) is None and stop(ws) is False


def test_deploy_failure_reports_the_log_tail(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "home")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ServingError) as err:
        deploy(CFG, str(not_a_model), ws, "tiny")
    assert "config.json" in err.value.cause  # the server's own error, read back from its log
    assert read_deployment(ws) is None
