"""`lmforge ui`: a real Prefect server and MLflow server on loopback, the pipeline deployed with
its retraining schedule and its config as the form a user edits in the Prefect UI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest
from conftest import REPO, TINY, free_port, wait_http
from readme import argv, readme_command


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The README's `lmforge ui [CONFIG] [--prefect-port 4200] [--mlflow-port 5000]`, on free ports."""
    home = tmp_path_factory.mktemp("ui-home")
    prefect_port, mlflow_port = free_port(), free_port()
    env = dict(os.environ, LMFORGE_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)  # lmforge puts Prefect's state in the workspace
    command = argv(readme_command("lmforge ui"), CONFIG=TINY, **{"4200": str(prefect_port), "5000": str(mlflow_port)})
    with open(home / "ui.out", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    api = f"http://127.0.0.1:{prefect_port}/api"
    try:
        wait_http(f"{api}/health", timeout=180, proc=proc)
        deployment = _wait_deployment(api, proc)
        yield {"api": api, "mlflow": f"http://127.0.0.1:{mlflow_port}", "home": home,
               "deployment": deployment, "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # The servers it started (in their own sessions) stop with it, also when it had to be killed.
        for url in (f"{api}/health", f"http://127.0.0.1:{mlflow_port}/health"):
            _wait_closed(url)


def _wait_closed(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
        except httpx.HTTPError:
            return
        time.sleep(0.5)
    raise AssertionError(f"{url} still answers after lmforge ui stopped")


def _wait_deployment(api: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "lmforge ui exited early"
        reply = httpx.get(f"{api}/deployments/name/lmforge-pipeline/lmforge", timeout=5)
        if reply.status_code == 200:
            return reply.json()
        time.sleep(1)
    raise TimeoutError("deployment never appeared")


def test_ui_prints_urls_and_serves_both_uis(ui):
    wait_http(f"{ui['mlflow']}/health", timeout=60)
    assert httpx.get(ui["mlflow"], timeout=10).status_code == 200
    state = json.loads((ui["home"] / "ui.json").read_text())
    assert state["mlflow_url"] == ui["mlflow"] and state["prefect_url"] == ui["api"].removesuffix("/api")
    out = (ui["home"] / "ui.out").read_text()
    assert "Prefect UI: http://127.0.0.1" in out and "MLflow UI:  http://127.0.0.1" in out


def test_deployment_has_schedule_and_config_form(ui):
    dep = ui["deployment"]
    crons = [s["schedule"].get("cron") for s in dep["schedules"]]
    assert "0 3 * * 0" in crons
    schema = dep["parameter_openapi_schema"]
    assert "config" in schema["properties"]
    # The form the UI renders is built from the pydantic stage models.
    assert {"TrainingConfig", "ModelConfig", "RegistryConfig"} <= set(schema.get("definitions", {}))
    assert dep["parameters"]["config"]["model"]["hidden_size"] == 64  # from configs/tiny.yaml


def test_run_started_from_the_deployment_with_edited_parameters(ui):
    """What a user does in the UI: Custom run with an edited parameter; the served deployment runs it."""
    dep = ui["deployment"]
    params = json.loads(json.dumps(dep["parameters"]))
    config = params["config"]
    config["registry"]["model_name"] = "edited-in-ui"
    # Edits a user makes for a quick run: in-process training (no Ray cluster) with fewer steps.
    config["training"]["placement"]["use_ray"] = False
    config["training"]["pretrain"]["steps"] = 10
    config["training"]["finetune"]["steps"] = 6
    params["deploy"] = False
    for _ in range(5):  # the SQLite-backed server can answer 5xx while busy writing
        reply = httpx.post(f"{ui['api']}/deployments/{dep['id']}/create_flow_run",
                           json={"parameters": params}, timeout=30)
        if reply.status_code < 500:
            break
        time.sleep(2)
    assert reply.status_code == 201, reply.text[:2000]
    run = reply.json()
    deadline = time.monotonic() + 400
    state = None
    while time.monotonic() < deadline:
        state = httpx.get(f"{ui['api']}/flow_runs/{run['id']}", timeout=10).json()["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED"):
            break
        time.sleep(3)
    assert state == "COMPLETED"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ui['home'] / 'mlflow' / 'mlflow.db'}")
    version = client.get_model_version_by_alias("edited-in-ui", "champion")
    assert str(version.version) == "1"
    params = client.get_run(version.run_id).data.params
    assert params["training.placement.use_ray"] == "false" and params["training.pretrain.steps"] == "10"
