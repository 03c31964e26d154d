"""The deploy stage: a real proxy and server process for a local model directory, probed, kept, rolled, stopped."""

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


def test_deploy_probes_records_keeps_its_port_and_stops(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "model")
    ws = Workspace(tmp_path / "home")
    try:
        first = deploy(CFG, str(model_dir), ws, "tiny")
        assert first.action == "deployed" and first.version == "local"
        assert first.endpoint.startswith("http://127.0.0.1:") and first.model_name == "tiny"
        assert first.probe_prompt == CFG.probe_prompt and isinstance(first.probe_response, str)
        assert first.latency_s > 0 and first.as_dict()["pid"] == first.pid
        assert _running(first.pid) and _running(first.proxy_pid)  # they outlive deploy(): they are the deployment
        record = read_deployment(ws)
        assert record["pid"] == first.pid and record["endpoint"] == first.endpoint
        models = httpx.get(f"{first.endpoint}/v1/models").json()["data"][0]
        assert models["id"] == "tiny" and models["metadata"]["source"] == str(model_dir)
        assert httpx.get(f"{first.endpoint}/health").json()["version"] == "local"
        assert "lmforge-serve listening on" in Path(record["log"]).read_text()

        same = deploy(CFG, str(model_dir), ws, "tiny")  # nothing moved: nothing restarts
        assert (same.action, same.pid, same.endpoint) == ("unchanged", first.pid, first.endpoint)

        # Another serving config rolls: the new server takes over the same port, then the old one stops.
        rolled = deploy(CFG.model_copy(update={"max_new_tokens": 6}), str(model_dir), ws, "tiny")
        assert rolled.action == "rolled" and rolled.endpoint == first.endpoint and rolled.proxy_pid == first.proxy_pid
        assert rolled.pid != first.pid and not _running(first.pid) and _running(rolled.pid)

        # A new version that cannot start leaves the running one serving.
        not_a_model = tmp_path / "empty"
        not_a_model.mkdir()
        with pytest.raises(ServingError):
            deploy(CFG, str(not_a_model), ws, "tiny")
        assert read_deployment(ws)["pid"] == rolled.pid
        answer = httpx.post(f"{rolled.endpoint}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200
    finally:
        stopped = stop(ws)
    assert stopped and not _running(rolled.pid) and not _running(rolled.proxy_pid)
    assert read_deployment(ws) is None and stop(ws) is False


def test_deploy_failure_reports_the_log_tail(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "home")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ServingError) as err:
        deploy(CFG, str(not_a_model), ws, "tiny")
    assert "config.json" in err.value.cause  # the server's own error, read back from its log
    assert read_deployment(ws) is None
