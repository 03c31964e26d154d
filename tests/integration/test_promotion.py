"""Promotion you can trust, against a real `mlflow server` (SQLite backend, loopback) and the session's
real Prefect server: a guardrail blocks a candidate that wins the deciding metric, the approval step
pauses a flow run with an input form that is answered through the Prefect API as the UI does
(approved, rejected, timed out), rollback moves the alias back (recorded, the deployment follows),
and every decision lands on the model card in the model directory and in MLflow.

Versions are registered from tiny model directories (tests/tiny_assets.py) with the metrics given
here, so nothing trains.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import BIN, free_port, run_cli, server_process
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from readme import argv, readme_command
from tiny_assets import build_model_dir

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import ApprovalConfig, Guardrail, PolicyConfig, RegistryConfig
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import RegistryError
from lmforge.core.workspace import Workspace
from lmforge.stages.deploy import deploy, stop
from lmforge.stages.promote import promote, settle_approval
from lmforge.stages.register import register
from lmforge.stages.rollback import rollback
from lmforge.tracking.card import CARD_FILE, TAG_CARD
from lmforge.tracking.mlflow_tracker import mlflow_client
from tasks.approval import promote_with_approval

GOOD = {"eval_perplexity": 100.0, "eval_rouge_l": 0.40, "eval_loss": 4.6}
GUARDED = PolicyConfig(margin=0.05, guardrails=[Guardrail(metric="eval_rouge_l", direction="max", max_regression=0.05)])
PLATFORM = PlatformConfig()  # MLflow comes from MLFLOW_TRACKING_URI: the server below


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, SQLite backend; artifacts written straight to its root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--default-artifact-root", str(root / "artifacts"), "--no-serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with server_process(command, f"{url}/health", root / "server.log", timeout=120):
        yield url


@pytest.fixture(autouse=True)
def _tracking(mlflow_server, ws, monkeypatch):
    # The CLI, the tasks (Workspace.from_env) and a deployed server all find MLflow and the workspace here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("LMFORGE_HOME", str(ws.home))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("promotion") / "home").ensure()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("base") / "tiny")


def _registry(name: str, policy: PolicyConfig = GUARDED) -> RegistryConfig:
    return RegistryConfig(model_name=name, experiment="promotion-tests", policy=policy)


def _register(ws: Workspace, base: Path, name: str, metrics: dict[str, float]) -> str:
    """A new version of ``name`` from its own copy of the tiny model (its card goes in that copy)."""
    model_dir = ws.home / "models" / f"{name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(base, model_dir)
    manifest = ws.home / "reports" / "manifest.json"  # the collect manifest's instruction report, for the card
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"sft": {"train": 9, "test": 1, "sources": {"local[0]": {"read": 11, "skipped": 1}}}}))
    return register(_registry(name), PLATFORM, ws, model_dir=model_dir,
                    params={"model": {"architecture": "llama", "base_model": ""},
                            "training": {"method": "sft", "finetune": {"steps": 5, "learning_rate": 3e-3}}},
                    metrics=metrics, history=[], dataset_inputs=[], tags={"lmforge.data.curated-corpus.digest": "d1g3st"},
                    reports=[manifest]).version


def test_guardrail_blocks_a_winner_and_the_card_records_it(ws, base_model):
    name, cfg = "guarded", _registry("guarded")
    v1 = _register(ws, base_model, name, GOOD)
    assert promote(cfg, PLATFORM, ws, v1).decision == "promoted"
    # 20% better perplexity, but ROUGE-L 25% lower where 5% is the most allowed.
    v2 = _register(ws, base_model, name, {**GOOD, "eval_perplexity": 80.0, "eval_rouge_l": 0.30})
    decision = promote(cfg, PLATFORM, ws, v2)
    assert (decision.decision, decision.rule, decision.promoted) == ("rejected", "guardrail", False)
    assert decision.champion_version == v1 and "+20.00%" in decision.reason
    guard = decision.guardrails[0]
    assert (guard["metric"], guard["candidate"], guard["champion"], guard["tolerance"], guard["passed"]) == \
        ("eval_rouge_l", 0.30, 0.40, 0.05, False)

    client = mlflow_client(ws, PLATFORM)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    found = client.get_model_version(name, v2)
    tags = found.tags
    assert (tags["lmforge.promotion.decision"], tags["lmforge.promotion.rule"]) == ("rejected", "guardrail")
    assert (tags["lmforge.promotion.candidate_value"], tags["lmforge.promotion.champion_value"]) == ("80", "100")
    assert json.loads(tags["lmforge.promotion.guardrails"])[0]["passed"] is False
    # The card: in the model directory, as an artifact of the version's run, and as the version's description.
    card_path = Path(tags["lmforge.card.path"])
    assert card_path.name == CARD_FILE and card_path.parent == Path(client.get_run(found.run_id).data.tags["lmforge.model_dir"])
    card = card_path.read_text()
    for text in (f"# guarded v{v2}", "decision | rejected", "rule | guardrail", "eval_perplexity | 80",
                 "| eval_rouge_l | 0.3 | 0.4 | 0.05 relative | no |", "curated-corpus digest | `d1g3st`",
                 "| local[0] | 11 | 1 |", "finetune steps | 5"):
        assert text in card, text
    assert tags[TAG_CARD] == f"runs:/{found.run_id}/model_card.md"
    logged = Path(client.download_artifacts(found.run_id, "model_card.md", str(ws.home / "dl")))
    assert logged.read_text() == card and found.description == card


# ---------------------------------------------------------------- approval in a Prefect flow


@flow(name="lmforge-promotion-approval")
def _approval_flow(cfg: RegistryConfig, platform: PlatformConfig, version: str) -> dict:
    return promote_with_approval(cfg, platform, version)  # the pipeline's promote step, pause included


def _run_flow(api: str, cfg: RegistryConfig, version: str, run_name: str) -> tuple[threading.Thread, dict]:
    """Start the flow in a thread (it blocks while paused); its result or error lands in the dict."""
    out: dict = {}

    def target():
        with temporary_settings({PREFECT_API_URL: api}):
            try:
                out["result"] = _approval_flow.with_options(flow_run_name=run_name)(cfg, PLATFORM, version)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which re-raises it
                out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _paused_run(api: str, run_name: str, out: dict, timeout: float = 60) -> dict:
    """The flow run named ``run_name`` once it is paused, as the UI lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert "error" not in out, out["error"]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [run_name]}}}).json()
        keyset = runs[0]["state"]["state_details"].get("run_input_keyset") if runs else None
        # The pause is proposed first, then its form saved (schema, then description): wait for the last.
        if keyset and runs[0]["state"]["type"] == "PAUSED" and \
                httpx.get(f"{api}/flow_runs/{runs[0]['id']}/input/{keyset['description']}").status_code == 200:
            return runs[0]
        time.sleep(0.3)
    raise AssertionError(f"flow run {run_name} never paused")


def _answer(api: str, run: dict, answer: dict) -> dict:
    """What the UI does: read the pause's input schema, render the form, resume with the filled-in input."""
    keyset = run["state"]["state_details"]["run_input_keyset"]
    schema = httpx.get(f"{api}/flow_runs/{run['id']}/input/{keyset['schema']}").json()  # values are JSON text
    assert schema["properties"]["approve"]["type"] == "boolean" and "approve" in schema["required"]
    description = httpx.get(f"{api}/flow_runs/{run['id']}/input/{keyset['description']}").json()
    assert "eval_perplexity" in description
    return _resume(api, run, answer)


def _resume(api: str, run: dict, answer: dict) -> dict:
    """POST the answer; the SQLite-backed test server can answer 5xx while busy writing, so retry."""
    for _ in range(5):
        reply = httpx.post(f"{api}/flow_runs/{run['id']}/resume", json={"run_input": answer}, timeout=30)
        if reply.status_code < 500:
            break
        time.sleep(2)
    assert reply.status_code < 500, reply.text[:2000]
    return reply.json()


def _finish(thread: threading.Thread, out: dict) -> dict:
    thread.join(timeout=90)
    assert not thread.is_alive(), "the flow never finished"
    if "error" in out:
        raise out["error"]
    return out["result"]


def _final_state(api: str, run_name: str) -> str:
    return httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [run_name]}}}).json()[0]["state"]["type"]


@pytest.mark.parametrize("approve", [True, False])
def test_approval_pauses_the_flow_and_records_the_answer(ws, base_model, prefect_server, approve):
    name = f"approval-{str(approve).lower()}"
    cfg = _registry(name, GUARDED.model_copy(update={"approval": ApprovalConfig(enabled=True, timeout_s=120)}))
    v1 = _register(ws, base_model, name, GOOD)
    settle_approval(cfg, PLATFORM, ws, v1, approved=True, comment="bootstrap")  # the first champion, by hand
    v2 = _register(ws, base_model, name, {**GOOD, "eval_perplexity": 90.0})

    run_name = f"{name}-{uuid.uuid4().hex[:6]}"
    thread, out = _run_flow(prefect_server, cfg, v2, run_name)
    run = _paused_run(prefect_server, run_name, out)
    client = mlflow_client(ws, PLATFORM)
    assert client.get_model_version(name, v2).tags["lmforge.promotion.decision"] == "pending"
    refused = _resume(prefect_server, run, {"comment": "?"})
    assert refused["status"] == "REJECT"  # the form needs an answer: approve is required
    comment = "looks right" if approve else "not yet"
    assert _answer(prefect_server, run, {"approve": approve, "comment": comment})["status"] == "ACCEPT"
    decision = _finish(thread, out)

    assert decision["decision"] == ("promoted" if approve else "rejected")
    assert decision["rule"] == "approval" and decision["approval"]["approved"] is approve
    assert decision["approval"]["comment"] == comment
    assert str(client.get_model_version_by_alias(name, "champion").version) == (v2 if approve else v1)
    tags = client.get_model_version(name, v2).tags
    assert tags["lmforge.promotion.decision"] == decision["decision"]
    assert json.loads(tags["lmforge.promotion.approval"])["via"] == f"prefect flow run {run['id']}"
    assert "Approval: " in client.get_model_version(name, v2).description
    assert _final_state(prefect_server, run_name) == "COMPLETED"


def test_approval_timeout_rejects(ws, base_model, prefect_server):
    name = "approval-timeout"
    cfg = _registry(name, PolicyConfig(approval=ApprovalConfig(enabled=True, timeout_s=2)))
    v1 = _register(ws, base_model, name, GOOD)
    run_name = f"{name}-{uuid.uuid4().hex[:6]}"
    thread, out = _run_flow(prefect_server, cfg, v1, run_name)
    decision = _finish(thread, out)
    assert (decision["decision"], decision["rule"]) == ("rejected", "approval_timeout")
    assert decision["approval"]["timed_out"] is True and "approval timeout" in decision["reason"]
    client = mlflow_client(ws, PLATFORM)
    assert not client.get_registered_model(name).aliases  # the first version, rules passed, still not promoted
    assert client.get_model_version(name, v1).tags["lmforge.promotion.rule"] == "approval_timeout"
    assert _final_state(prefect_server, run_name) == "COMPLETED"


def test_approval_outside_a_flow_leaves_a_candidate_until_the_cli_answers(ws, base_model):
    name = "approval-cli"
    cfg = _registry(name, PolicyConfig(approval=ApprovalConfig(enabled=True)))
    v1 = _register(ws, base_model, name, GOOD)
    pending = promote(cfg, PLATFORM, ws, v1)
    assert pending.decision == "pending" and f"--approve {v1}" in pending.reason
    client = mlflow_client(ws, PLATFORM)
    assert not client.get_registered_model(name).aliases
    config = ws.home / f"{name}.yaml"
    config.write_text(f"registry:\n  model_name: {name}\n  experiment: promotion-tests\n"
                      "  policy:\n    approval: {enabled: true}\n")
    answered = run_cli(["promote", str(config), "--approve", v1, "--comment", "ok", "--json"], ws.home)
    assert answered.returncode == 0, answered.stderr
    result = json.loads(answered.stdout.strip().splitlines()[-1])
    assert (result["decision"], result["rule"], result["approval"]["comment"]) == ("promoted", "approval", "ok")
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


# ---------------------------------------------------------------- rollback


def test_rollback_moves_the_alias_back_and_the_deployment_follows(ws, base_model):
    name, cfg = "rollback", _registry("rollback")
    v1 = _register(ws, base_model, name, GOOD)
    v2 = _register(ws, base_model, name, {**GOOD, "eval_perplexity": 80.0})
    assert promote(cfg, PLATFORM, ws, v1).promoted and promote(cfg, PLATFORM, ws, v2).promoted
    uri = f"models:/{name}@champion"
    first = deploy(ServingConfig(), uri, ws, name)
    try:
        assert (ws.serving_dir / "models" / f"{name}-v{v2}").is_dir()
        result = rollback(cfg, PLATFORM, ws)
        assert (result.from_version, result.to_version, result.alias) == (v2, v1, "champion")
        assert result.deployment["action"] == "redeployed" and result.deployment["pid"] != first.pid
        assert (ws.serving_dir / "models" / f"{name}-v{v1}").is_dir()  # the new server downloaded v1
        assert httpx.get(f"{result.deployment['endpoint']}/health", timeout=10).json()["model"] == name
    finally:
        stop(ws)

    client = mlflow_client(ws, PLATFORM)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    assert client.get_model_version(name, v2).tags["lmforge.rollback.demoted_to"] == v1
    assert client.get_model_version(name, v1).tags["lmforge.rollback.restored_from"] == v2
    assert f"Rolled back: the alias moved from this version to v{v1}" in client.get_model_version(name, v2).description

    # Nothing before v1: a clear error with the fix, and the alias stays.
    with pytest.raises(RegistryError) as err:
        rollback(cfg, PLATFORM, ws)
    assert "no earlier holder" in err.value.cause and "lmforge promote" in err.value.fix
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


def test_readme_rollback_command(ws, base_model):
    """The README's `lmforge rollback [MODEL] [--json]`, as a user types it."""
    name, cfg = "rollback-cli", _registry("rollback-cli")
    for metrics in (GOOD, {**GOOD, "eval_perplexity": 80.0}):
        promote(cfg, PLATFORM, ws, _register(ws, base_model, name, metrics))
    result = subprocess.run(argv(readme_command("lmforge rollback"), MODEL=name), capture_output=True, text=True,
                            env=dict(os.environ, LMFORGE_HOME=str(ws.home)), timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["alias"], out["from_version"], out["to_version"]) == ("champion", "2", "1")
    again = run_cli(["rollback", name, "--json"], ws.home)
    assert again.returncode == 2 and "error:" in again.stderr and "fix:" in again.stderr and "Traceback" not in again.stderr
