"""`lmforge stack deploy` on a real Prefect server: the deployments are listed with their schedules and
triggers, and registering again updates them in place. In the slow tier, the whole loop on `lmforge stack
up` (a real worker, MLflow and Ray head on free ports): the pipeline deployment trains the first version
through the worker, new files dropped into a watched directory make a collect run emit
`lmforge.data.collected`, that starts one retraining run which registers a new version, more files within
the debounce window start none, and `lmforge stack down` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest
from conftest import REPO, TINY, run_cli
from readme import argv, readme_command
from stack_runs import deploy, events, finished, last_json, processes_of, runs, stack_config, start, wait, write_docs

DEPLOY = readme_command("lmforge stack deploy --config CONFIG")
NAMES = ["lmforge-pipeline/pipeline", "lmforge-pipeline/retrain", "lmforge-tune/tune", "lmforge-deploy/deploy",
         "lmforge-collect/watch"]


def test_deploy_lists_the_deployments_and_updates_them_in_place(prefect_server, tmp_path):
    """Registered on the server with their schedules and triggers; registering again with the watcher turned
    off keeps the same deployments (same ids), turns their schedule and trigger off, doubles nothing."""
    from flows.deployments import register
    from lmforge.config import load_config
    from lmforge.core.workspace import Workspace

    ws = Workspace(tmp_path / "home")
    on = stack_config(tmp_path, "on", tmp_path, retrain_on_new_data=True, watch_interval_s=60, retrain_debounce_s=600)
    first = {d["name"]: d for d in register(load_config(on), ws, prefect_server)}
    assert list(first) == NAMES
    assert {d["work_pool"] for d in first.values()} == {"lmforge"}
    assert first["lmforge-pipeline/retrain"]["schedules"] == [{"schedule": "0 3 * * 0", "active": True}]
    assert first["lmforge-pipeline/retrain"]["triggers"] == [
        {"name": "lmforge-retrain-on-new-data", "enabled": True, "expect": ["lmforge.data.collected"],
         "within_s": 600.0}]
    assert first["lmforge-collect/watch"]["schedules"] == [{"schedule": "every 60 s", "active": True}]

    off = stack_config(tmp_path, "off", tmp_path)
    again = {d["name"]: d for d in register(load_config(off), ws, prefect_server)}
    assert {n: d["id"] for n, d in again.items()} == {n: d["id"] for n, d in first.items()}
    assert again["lmforge-pipeline/retrain"]["triggers"][0]["enabled"] is False
    assert again["lmforge-collect/watch"]["schedules"] == [{"schedule": "every 300 s", "active": False}]
    # What the server holds, read directly: one deployment per name, one automation for the retrain trigger.
    deployments = httpx.post(f"{prefect_server}/deployments/filter", json={"limit": 200}, timeout=30).json()
    ours = [d for d in deployments if d["id"] in {x["id"] for x in first.values()}]
    assert len(ours) == 5
    automations = httpx.post(f"{prefect_server}/automations/filter", json={}, timeout=30).json()
    assert [a["name"] for a in automations].count("lmforge-retrain-on-new-data") == 1


def test_deploy_without_a_server_names_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([*argv(DEPLOY, CONFIG=TINY)], env={**env, "LMFORGE_HOME": str(tmp_path / "home")},
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no Prefect server to register deployments on" in result.stderr
    assert "lmforge stack up" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_new_files_start_one_retrain_per_window_on_the_worker(tmp_path):
    """About 8 minutes on a busy 2-core machine: the stack, two trainings through the worker, the watcher."""
    from mlflow import MlflowClient

    home, watched = tmp_path / "home", tmp_path / "incoming"
    watched.mkdir()
    write_docs(watched, "a", 3)
    off = stack_config(tmp_path, "off", watched)
    on = stack_config(tmp_path, "on", watched, retrain_on_new_data=True, watch_interval_s=15, retrain_debounce_s=1800)
    up = ["stack", "up", "--json", "--ray-cpus", "2", "--prefect-port", "0", "--mlflow-port", "0", "--ray-port", "0"]
    facts = last_json(run_cli(up, home, timeout=400))
    api, records = facts["env"]["PREFECT_API_URL"], [json.loads(p.read_text()) for p in (home / "stack").glob("*.json")]
    try:
        # The first version: the pipeline deployment, run by the worker (no PREFECT_API_URL: this home's stack).
        deployments = deploy(DEPLOY, off, home)
        first = start(api, deployments["lmforge-pipeline/pipeline"]["id"], {"deploy": False})
        assert finished(api, first["id"], 600)["state"]["type"] == "COMPLETED"
        mlflow = MlflowClient(tracking_uri=facts["env"]["MLFLOW_TRACKING_URI"])

        def versions() -> list[str]:
            return sorted(v.version for v in mlflow.search_model_versions("name='lmforge-demo'"))
        assert versions() == ["1"]

        # Turn the watcher on (the same deployments, updated), then drop files: one retrain, a new version.
        assert {n: d["id"] for n, d in deploy(DEPLOY, on, home).items()} == {n: d["id"] for n, d in deployments.items()}
        retrain_id = deployments["lmforge-pipeline/retrain"]["id"]
        resource = f"lmforge.workspace.{home}"
        before = {e["id"] for e in events(api, resource)}  # the pipeline's first collect, before the trigger
        write_docs(watched, "b", 3)
        (retrain,) = wait("a retraining run", lambda: runs(api, retrain_id), 300)
        assert retrain["parameters"]["continue_from"] == "champion"
        assert finished(api, retrain["id"], 600)["state"]["type"] == "COMPLETED"
        assert versions() == ["1", "2"]
        seen = events(api, resource)
        assert sum(e["payload"]["documents_new"] for e in seen if e["id"] not in before) == 3

        # More files within the debounce window: collected, the event emitted, no second retrain.
        write_docs(watched, "c", 2)
        wait("the second batch's event", lambda: len(events(api, resource)) > len(seen), 180)
        time.sleep(15)  # the trigger acts within a second or two of an event
        assert len(runs(api, retrain_id)) == 1
    finally:
        run_cli(["deploy", off, "--stop"], home, timeout=120)  # a promoted retrain served its champion
        down = last_json(run_cli(["stack", "down", "--json"], home, timeout=200))
    assert sorted(down["stopped"]) == sorted(r["role"] for r in records)
    for record in records:
        with pytest.raises(ProcessLookupError):
            os.killpg(record["pgid"], 0)
    assert processes_of(home) == []
