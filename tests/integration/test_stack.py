"""`lmforge stack up | status | down`, for real on loopback (free ports): a Prefect server and a worker on
the process pool, MLflow, a Ray head and moto's S3 server as processes; a flow deployed to the pool runs on
the worker with the stack's services in its environment; `down` leaves no process behind.

About two minutes on a busy 2-core machine (five servers start, a flow run starts in a subprocess): slow tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import BIN, REPO, run_cli
from readme import argv, readme_command

pytestmark = pytest.mark.slow

# The README's commands (with --s3 and --json), on free ports, the Ray head offering one CPU of this shared machine.
UP = [*argv(readme_command("lmforge stack up"))[1:], "--ray-cpus", "1", "--prefect-port", "0", "--mlflow-port", "0",
      "--ray-port", "0", "--s3-port", "0"]
STATUS = argv(readme_command("lmforge stack status"))[1:]
DOWN = argv(readme_command("lmforge stack down"))[1:]


def _json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack") / "home"
    started = time.monotonic()
    try:
        facts = _json(run_cli(UP, home, timeout=400))
        yield {"home": home, "facts": facts, "up_s": time.monotonic() - started}
    finally:
        run_cli(DOWN, home, timeout=200)


def test_up_starts_every_role_healthy_and_prints_urls(stack):
    facts = stack["facts"]
    assert facts["started"] == ["prefect-server", "mlflow", "ray-head", "s3", "prefect-worker"]
    assert {role: r["state"] for role, r in facts["roles"].items()} == dict.fromkeys(facts["started"], "running")
    env = facts["env"]
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:") and env["PREFECT_API_URL"].endswith("/api")
    assert httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=10).status_code == 200
    pool = httpx.get(f"{env['PREFECT_API_URL']}/work_pools/lmforge", timeout=10).json()
    assert pool["type"] == "process"
    assert httpx.get(f"{env['MLFLOW_TRACKING_URI']}/health", timeout=10).status_code == 200
    assert httpx.get(env["AWS_ENDPOINT_URL"], timeout=10).status_code == 200
    # The Ray head answers `ray status` at the printed address, with the printed authentication mode.
    ray_env = {**os.environ, "RAY_AUTH_MODE": env["RAY_AUTH_MODE"]}
    status = subprocess.run([str(BIN / "ray"), "status", "--address", env["RAY_ADDRESS"]], env=ray_env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "Active:" in status.stdout, status.stdout + status.stderr
    # Pid files and logs under the workspace.
    for role in facts["started"]:
        assert (stack["home"] / "stack" / f"{role}.json").is_file()
        assert (stack["home"] / "stack" / "logs" / f"{role}.log").is_file()


def test_status_and_a_second_up_report_the_running_stack(stack):
    status = _json(run_cli(STATUS, stack["home"], timeout=120))
    assert all(r["state"] == "running" for r in status["roles"].values())
    again = _json(run_cli(UP, stack["home"], timeout=120))
    assert again["started"] == []
    assert again["roles"] == {role: r for role, r in stack["facts"]["roles"].items()}  # same pids, same URLs


def test_a_deployment_runs_on_the_worker_with_the_stack_services(stack, tmp_path):
    """What `lmforge stack up` is for: a flow deployed to the pool runs without a terminal open, and sees the
    stack's MLflow, Ray and workspace."""
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import json, os
        from prefect import flow

        @flow
        def probe(out: str) -> None:
            keys = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "LMFORGE_HOME")
            with open(out, "w") as f:
                json.dump({k: os.environ.get(k) for k in keys}, f)
    """))
    out = tmp_path / "seen.json"
    env = stack["facts"]["env"]
    deploy_and_run = textwrap.dedent(f"""
        from prefect import flow
        from prefect.deployments import run_deployment

        flow.from_source(source={str(tmp_path)!r}, entrypoint="probe.py:probe").deploy(
            name="probe", work_pool_name="lmforge", print_next_steps=False)
        run = run_deployment("probe/probe", parameters={{"out": {str(out)!r}}}, timeout=240)
        print(run.state.type.value)
    """)
    result = subprocess.run([sys.executable, "-c", deploy_and_run], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PREFECT_API_URL": env["PREFECT_API_URL"]})
    assert result.returncode == 0 and result.stdout.strip().endswith("COMPLETED"), result.stdout + result.stderr
    seen = json.loads(out.read_text())
    assert seen == {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"], "RAY_ADDRESS": env["RAY_ADDRESS"],
                    "RAY_AUTH_MODE": env["RAY_AUTH_MODE"], "LMFORGE_HOME": str(stack["home"])}


def test_down_leaves_no_process(stack):
    records = [json.loads(p.read_text()) for p in (stack["home"] / "stack").glob("*.json")]
    assert len(records) == 5
    down = _json(run_cli(DOWN, stack["home"], timeout=200))
    assert sorted(down["stopped"]) == sorted(r["role"] for r in records)
    for record in records:
        with pytest.raises(ProcessLookupError):
            os.killpg(record["pgid"], 0)
    ray_dir = next(r for r in records if r["role"] == "ray-head")["marker"]
    leftover = subprocess.run(["pgrep", "-f", ray_dir], capture_output=True, text=True)
    assert leftover.stdout == "", leftover.stdout
    assert not Path(ray_dir).exists()
    status = _json(run_cli(STATUS, stack["home"], timeout=120))
    assert {r["state"] for r in status["roles"].values()} == {"stopped"}


def test_a_role_that_fails_stops_what_up_started(tmp_path):
    """MLflow refuses its store: `up` names the role and its log, and the Prefect server it started is stopped."""
    from lmforge.config import PipelineConfig
    from lmforge.core.errors import OrchestrationError
    from lmforge.core.workspace import Workspace
    from lmforge.stack import control
    from lmforge.stack.roles import Options

    ws = Workspace(tmp_path / "home")
    options = Options(prefect_port=0, mlflow_port=0, mlflow_db="bogus://nowhere", roles=("prefect-server", "mlflow"))
    with pytest.raises(OrchestrationError) as err:
        control.up(ws, PipelineConfig(), options)
    assert "mlflow exited with code" in err.value.cause
    assert "mlflow.log" in err.value.fix and "bogus://nowhere" in err.value.fix
    assert list((ws.home / "stack").glob("*.json")) == []
    assert {s.state for s in control.status(ws).values()} == {"stopped"}
    assert _processes_with_env("PREFECT_HOME", str(ws.prefect_dir)) == []


def _processes_with_env(name: str, value: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(name) == value:
                found.append(proc.info["pid"])
        except psutil.Error:
            continue  # gone meanwhile, or another user's
    return found
