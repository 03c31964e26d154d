"""The whole lifecycle through the CLI, as a user runs it: real Prefect server, MLflow on SQLite,
local Ray, Great Expectations, and the inference server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import REPO, run_cli

TINY = str(REPO / "configs" / "tiny.yaml")


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def home(pipeline):
    return pipeline["home"]


@pytest.fixture(scope="module")
def first_run(pipeline):
    """The README's `make run` (conftest's ``pipeline``): the first run of this workspace."""
    return pipeline["summary"]


def test_first_run_registers_promotes_and_serves(first_run, prefect_server):
    s = first_run
    assert s["model_name"] == "lmforge-demo" and s["version"] == "1"
    assert s["aliases"] == ["champion"]
    assert s["promoted"]["promoted"] is True and "first" in s["promoted"]["reason"].lower()
    for metric in ("eval_perplexity", "eval_exact_match", "eval_rouge_l"):
        assert metric in s["metrics"]
    assert s["mlflow_tracking_uri"].startswith("sqlite:///")
    # The deployed server is still up and answers a new request.
    reply = httpx.post(f"{s['endpoint']}/v1/completions",
                       json={"model": "lmforge-demo", "prompt": "The json module", "max_tokens": 4},
                       timeout=30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None
    # The flow run is recorded, completed, in the Prefect server.
    run = httpx.get(f"{prefect_server}/flow_runs/{s['flow_run_id']}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED"


def test_mlflow_holds_lineage(first_run, home):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first_run["mlflow_tracking_uri"])
    version = client.get_model_version_by_alias("lmforge-demo", "champion")
    assert str(version.version) == "1"
    assert version.tags["lmforge.flow_run_id"] == first_run["flow_run_id"]
    assert "lmforge.data.curated-corpus.digest" in version.tags
    run = client.get_run(version.run_id)
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 1
    assert run.inputs.dataset_inputs, "dataset inputs with digests are logged"
    reports = {item.path for item in client.list_artifacts(run.info.run_id, "data_reports")}
    assert {"data_reports/manifest.json", "data_reports/report.json", "data_reports/result.json"} <= reports
    # Training read the tokenized datasets that the data gate validated, not a fresh tokenization.
    assert run.data.params["data_pretrain"].startswith("tokenized dataset ")
    assert run.data.params["data_finetune"].startswith("tokenized dataset ")


def test_second_run_registers_v2_and_promotes_only_by_margin(first_run, home, prefect_server):
    inline = home / "inline.yaml"
    tiny = Path(TINY).read_text()
    assert "  logging: {every: 5}" in tiny  # the line the in-line setting goes after
    inline.write_text(tiny.replace("  logging: {every: 5}", "  logging: {every: 5}\n  placement: {use_ray: false}"))
    result = run_cli(["run", str(inline), "--json", "--no-deploy"], home, env={"PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr[-4000:]
    s = _last_json(result.stdout)
    assert s["version"] == "2"
    v1 = first_run["metrics"]["eval_perplexity"]
    v2 = s["metrics"]["eval_perplexity"]
    should_move = v2 < v1 * (1 - 0.01)
    assert s["promoted"]["promoted"] is should_move, s["promoted"]
    assert s["champion_version"] == ("2" if should_move else "1")
    assert f"{v1:.4g}"[:4] in s["promoted"]["reason"] or str(round(v1, 2))[:4] in s["promoted"]["reason"]


def test_failed_validation_stops_before_training_and_registers_nothing(first_run, home, prefect_server, tmp_path):
    bad = tmp_path / "strict.yaml"
    bad.write_text(Path(TINY).read_text().replace("min_documents: 20", "min_documents: 1000000"))
    result = run_cli(["run", str(bad), "--json"], home, env={"PREFECT_API_URL": prefect_server})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "fix:" in result.stderr and "Traceback" not in result.stderr.split("error:")[-1]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first_run["mlflow_tracking_uri"])
    versions = client.search_model_versions("name='lmforge-demo'")
    assert max(int(v.version) for v in versions) <= 2  # nothing registered by the failed run


def test_stage_commands_run_alone_from_the_workspace(first_run, home):
    """Each stage command reads what earlier stages left in the workspace (training is covered
    by the runs above and by test_train.py; curate and validate alone by test_readme.py's
    curation commands)."""
    collected = run_cli(["collect", TINY, "--json"], home)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert _last_json(collected.stdout)["documents_new"] == 0  # incremental: nothing new
    tokenized = run_cli(["tokenize", TINY, "--json"], home)
    assert tokenized.returncode == 0, tokenized.stderr[-3000:]
    evaluated = run_cli(["evaluate", TINY, "--json"], home)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert _last_json(evaluated.stdout)["eval_perplexity"] > 1
    promoted = run_cli(["promote", TINY, "--json"], home)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    decision = _last_json(promoted.stdout)
    assert decision["version"] == "2" and decision["promoted"] is False  # same model: no new version
    models = run_cli(["models", "--json"], home)
    assert models.returncode == 0 and "lmforge-demo" in _last_json(models.stdout)
