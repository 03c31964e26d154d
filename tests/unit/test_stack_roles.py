"""The choices `lmforge stack up` makes before it starts anything: which roles, MLflow's store, Ray's
authentication, ports; and what it prints for a client."""

from __future__ import annotations

import os
import socket

import pytest

from lmforge.config import PipelineConfig
from lmforge.core.errors import OrchestrationError
from lmforge.core.workspace import Workspace
from lmforge.stack import summary
from lmforge.stack.control import RoleState
from lmforge.stack.processes import port_or_free
from lmforge.stack.roles import Options, mlflow_backend, ray_auth_mode, ray_head


def test_default_roles_and_s3_on_request():
    assert Options().wanted() == ["prefect-server", "mlflow", "ray-head", "prefect-worker"]
    assert Options(s3=True).wanted() == ["prefect-server", "mlflow", "ray-head", "s3", "prefect-worker"]


def test_mlflow_serves_a_database_never_a_tracking_server_url(tmp_path):
    """`lmforge ui` once passed MLFLOW_TRACKING_URI=http://... to `mlflow server --backend-store-uri`."""
    ws = Workspace(tmp_path / "home")
    remote = PipelineConfig.model_validate({"platform": {"mlflow_tracking_uri": "http://mlflow:5000"}})
    assert mlflow_backend(ws, remote, None) == ws.mlflow_tracking_uri
    postgres = PipelineConfig.model_validate({"platform": {"mlflow_tracking_uri": "postgresql://db/mlflow"}})
    assert mlflow_backend(ws, postgres, None) == "postgresql://db/mlflow"
    assert mlflow_backend(ws, remote, "sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_ray_head_needs_a_token_unless_authentication_is_off(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(OrchestrationError) as err:
        ray_auth_mode()
    assert "ray get-auth-token --generate" in err.value.fix and "RAY_AUTH_MODE=disabled" in err.value.fix
    (tmp_path / "missing").write_text("a-token")
    assert ray_auth_mode() == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = ray_head(Workspace(tmp_path / "home"), 6379, list(range(7)), 1)
    assert spec.env["RAY_AUTH_MODE"] == "disabled" and "RAY_ADDRESS" not in spec.env
    # The temp dir is short (unix socket paths) and named in the command: `down` finds Ray's processes by it.
    assert len(spec.marker) < 40 and f"--temp-dir={spec.marker}" in spec.command and "--num-cpus=1" in spec.command


def test_a_taken_port_names_its_flag():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        with pytest.raises(OrchestrationError) as err:
            port_or_free(taken, "--mlflow-port")
    assert "--mlflow-port" in err.value.fix
    assert port_or_free(0, "--mlflow-port") > 0


def test_summary_points_a_client_at_the_running_roles():
    states = {"prefect-server": RoleState("prefect-server", "running", 1, "http://127.0.0.1:4200/api"),
              "mlflow": RoleState("mlflow", "stopped"),
              "ray-head": RoleState("ray-head", "running", 2, "127.0.0.1:6379", extra={"auth_mode": "token"})}
    facts = summary(states)
    assert facts["env"] == {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "RAY_ADDRESS": "127.0.0.1:6379",
                            "RAY_AUTH_MODE": "token"}
    assert facts["prefect_ui"] == "http://127.0.0.1:4200"
    assert facts["roles"]["mlflow"] == {"state": "stopped", "pid": None, "url": None, "log": None}


def test_stopping_a_role_this_process_started_does_not_wait_out_its_grace(tmp_path):
    """`lmforge ui` starts its servers as children: one that exits on SIGTERM stays a zombie (a member of
    its process group) until reaped, and the stop once waited the whole grace for each (~40 s to Ctrl-C)."""
    import sys
    import time

    from lmforge.stack import processes

    proc = processes.launch([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "role.log",
                            env={}, tied=True)
    record = processes.Record("demo", proc.pid, os.getpgid(proc.pid), 0, "", str(tmp_path / "role.log"), [])
    started = time.monotonic()
    processes.stop(record, grace_s=60)
    assert time.monotonic() - started < 30  # exits at once on SIGTERM; the bug waited the 60 s grace
    assert not processes.group_alive(record.pgid)
