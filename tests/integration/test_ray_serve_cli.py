"""`lmforge deploy` with `serving.platform: ray` from the command line, on the Ray head of `lmforge stack`.

The CLI process exits after the deploy; the Serve application must keep answering from the stack's Ray head
(the deploy found it through the workspace's stack record), and `lmforge deploy --stop` deletes it. Slow: a
Ray head and a replica that imports torch take a minute and more on the shared machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from conftest import free_port, run_cli
from helpers import make_tiny_model_dir

from lmforge.config.pipeline import PipelineConfig
from lmforge.core.workspace import Workspace
from lmforge.stack import control
from lmforge.stack.roles import Options

pytestmark = pytest.mark.slow


def test_cli_deploy_on_the_stack_ray_head_outlives_the_command_and_stops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    home = tmp_path / "home"
    ws = Workspace(home).ensure()
    model = make_tiny_model_dir(tmp_path / "model")
    port = free_port()
    config = tmp_path / "ray.yaml"
    config.write_text(f"serving:\n  platform: ray\n  max_new_tokens: 4\n  server: {{startup_timeout_s: 400}}\n"
                      f"  ray: {{num_replicas: 1, http_port: {port}}}\n")
    control.up(ws, PipelineConfig(), Options(ray_port=0, ray_cpus=2, roles=("ray-head",)))
    try:
        env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        done = run_cli(["deploy", str(config), "--model", str(model), "--json"], home, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert (result["action"], result["endpoint"]) == ("deployed", f"http://127.0.0.1:{port}")
        # The command has exited: the replicas live on the stack's Ray head.
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["status"] == "ok" and health["version"] == "local"

        again = run_cli(["deploy", str(config), "--model", str(model), "--json"], home, env=env)
        assert json.loads(again.stdout.strip().splitlines()[-1])["action"] == "unchanged", again.stderr[-2000:]

        stopped = run_cli(["deploy", str(config), "--stop", "--json"], home, env=env)
        assert json.loads(stopped.stdout.strip().splitlines()[-1])["stopped"] is True, stopped.stderr[-2000:]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 404  # no application
    finally:
        control.down(ws)
