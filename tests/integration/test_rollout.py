"""The local-process rollout under load: real MLflow (SQLite in the workspace), a real proxy and real server
processes on loopback. v1 is deployed; v2 is promoted and deployed while a thread sends completions through
the stable endpoint without pause: no answer but 200, the port stays, /health, /v1/models and the MLflow tags
follow; a deploy with nothing moved does nothing; rollback rolls back the same way, under the same load.

Versions are registered from one tiny model directory (tests/tiny_assets.py) with the metrics given here.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from tiny_assets import build_model_dir

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import PolicyConfig, RegistryConfig
from lmforge.config.serving import ServerConfig, ServingConfig
from lmforge.core.workspace import Workspace
from lmforge.stages.deploy import deploy, stop
from lmforge.stages.promote import promote
from lmforge.stages.register import register
from lmforge.stages.rollback import rollback
from lmforge.stages.rollout import alive
from lmforge.tracking.deployment import TAG_DEPLOYED_AT, TAG_ENDPOINT, TAG_RETIRED_AT
from lmforge.tracking.mlflow_tracker import mlflow_client

PLATFORM = PlatformConfig()
SERVING = ServingConfig(max_new_tokens=8, server=ServerConfig(startup_timeout_s=240, drain_timeout_s=20))
NAME = "rolling"
REGISTRY = RegistryConfig(model_name=NAME, experiment="rollout-tests", policy=PolicyConfig(margin=0.05))


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Workspace:
    # MLflow on SQLite in this workspace, for the test and the server processes it starts alike.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    ws = Workspace(tmp_path / "home").ensure()
    monkeypatch.setenv("LMFORGE_HOME", str(ws.home))
    return ws


class SteadyLoad:
    """One client on a keep-alive connection sending short completions back to back; every answer counted."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint, self.ok = endpoint, 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.endpoint, timeout=60) as client:
            while not self.stopping.is_set():
                try:
                    reply = client.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2})
                    if reply.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{reply.status_code} {reply.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> SteadyLoad:
        self.thread.start()
        self.wait_for(5)
        return self

    def wait_for(self, more: int, timeout: float = 120) -> None:
        target, deadline = self.ok + more, time.monotonic() + timeout
        while self.ok < target and time.monotonic() < deadline and not self.failures:
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.wait_for(5)  # keep it going past the switch, through the old server's stop
        self.stopping.set()
        self.thread.join(timeout=120)


def _register(ws: Workspace, base: Path, perplexity: float) -> str:
    model_dir = ws.home / "models" / f"{NAME}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(base, model_dir)
    return register(REGISTRY, PLATFORM, ws, model_dir=model_dir,
                    params={"model": {"architecture": "llama", "base_model": ""}},
                    metrics={"eval_perplexity": perplexity}, history=[], dataset_inputs=[], tags={}).version


def _served(endpoint: str) -> tuple[str, dict[str, str]]:
    health = httpx.get(f"{endpoint}/health", timeout=10).json()
    return health["version"], httpx.get(f"{endpoint}/v1/models", timeout=10).json()["data"][0]["metadata"]


def test_roll_under_load_follows_the_alias_and_rolls_back(home, tmp_path):
    base = build_model_dir(tmp_path / "tiny")
    uri = f"models:/{NAME}@champion"
    v1 = _register(home, base, 100.0)
    assert promote(REGISTRY, PLATFORM, home, v1).promoted
    client = mlflow_client(home, PLATFORM)
    first = deploy(SERVING, uri, home, NAME)
    try:
        assert (first.action, first.version) == ("deployed", v1)
        v2 = _register(home, base, 80.0)
        assert promote(REGISTRY, PLATFORM, home, v2).promoted

        with SteadyLoad(first.endpoint) as load:
            second = deploy(SERVING, uri, home, NAME)
        assert load.failures == [] and load.ok >= 10
        assert (second.action, second.version, second.endpoint) == ("rolled", v2, first.endpoint)
        assert second.pid != first.pid and not alive(first.pid) and second.proxy_pid == first.proxy_pid
        version, metadata = _served(first.endpoint)
        assert version == v2 and (metadata["registered_name"], metadata["alias"]) == (NAME, "champion")
        assert metadata["run_id"] == client.get_model_version(NAME, v2).run_id
        tags_v1, tags_v2 = (client.get_model_version(NAME, v).tags for v in (v1, v2))
        assert tags_v2[TAG_ENDPOINT] == first.endpoint and TAG_DEPLOYED_AT in tags_v2
        assert TAG_ENDPOINT not in tags_v1 and TAG_DEPLOYED_AT not in tags_v1 and TAG_RETIRED_AT in tags_v1

        again = deploy(SERVING, uri, home, NAME)  # the alias did not move
        assert (again.action, again.pid, again.version) == ("unchanged", second.pid, v2)

        with SteadyLoad(first.endpoint) as load:
            back = rollback(REGISTRY, PLATFORM, home)
        assert load.failures == [] and (back.from_version, back.to_version) == (v2, v1)
        assert (back.deployment["rollout"], back.deployment["endpoint"]) == ("rolled", first.endpoint)
        assert _served(first.endpoint)[0] == v1 and not alive(second.pid)
        assert client.get_model_version(NAME, v1).tags[TAG_ENDPOINT] == first.endpoint
        assert TAG_ENDPOINT not in client.get_model_version(NAME, v2).tags
    finally:
        stop(home)
    assert TAG_ENDPOINT not in client.get_model_version(NAME, v1).tags  # nothing serves it any more
