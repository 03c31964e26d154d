"""Test-wide settings: offline hubs, a throwaway workspace, and one real Prefect server.

Nothing here is mocked: the Prefect server fixture starts `prefect server start` on a free
loopback port (SQLite in a temp dir), which the pipeline tests and CLI subprocesses report to.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="lmforge-tests-"))
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "LMFORGE_HOME": str(_SESSION_TMP / "home"),
    "LMFORGE_CACHE": str(_SESSION_TMP / "cache"),  # the storage layer's read cache: never the user's
    "RAY_DEDUP_LOGS": "1",
})
for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
    os.environ.pop(var, None)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# Test files that share the session's `pipeline` run (and its deployed server).
PIPELINE_FILES = ("tests/e2e/test_pipeline.py", "tests/e2e/test_readme.py")


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test` runs two workers) each test file runs on one worker, so its
    module fixtures (servers, trained models) are built once, and the pipeline-sharing files run on
    the same worker, so the pipeline runs once. (xdist's `loadgroup` marks do not group under
    pytest 9: they rename a node id pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "pipeline" if path in PIPELINE_FILES else path

    return ByFile(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LMFORGE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; run with LMFORGE_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


@contextmanager
def server_process(command: list[str], health: str, log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 180) -> Iterator[subprocess.Popen]:
    """A server started as a user starts it, in its own session, ready once ``health`` answers 200;
    stopped with its whole process group (servers fork workers)."""
    with open(log_path, "wb") as log:  # the server keeps its own descriptor
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health, timeout=timeout, proc=proc)
        yield proc
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server on loopback for the whole session; yields its API URL."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(_SESSION_TMP / "prefect-server"))
    api = f"http://127.0.0.1:{port}/api"
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with server_process(command, f"{api}/health", _SESSION_TMP / "prefect-server.log", env=env):
        yield api


def run_cli(args: list[str], home: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `lmforge` console script the way a user would."""
    full_env = dict(os.environ, LMFORGE_HOME=str(home), **(env or {}))
    return subprocess.run([str(BIN / "lmforge"), *args], env=full_env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tokenized_workspace(tmp_path_factory):
    """A factory: ``tokenized_workspace(name, model)`` is a fresh Workspace holding the stdlib corpus
    (helpers.write_corpus) and a tokenizer trained on it for ``model``."""
    from helpers import write_corpus

    from lmforge.core.workspace import Workspace
    from lmforge.tokenizer.build import train_tokenizer

    def make(name: str, model):
        ws = Workspace(tmp_path_factory.mktemp(name) / "home")
        write_corpus(ws)
        train_tokenizer(model, ws)
        return ws

    return make


@pytest.fixture(scope="module")
def ray_session():
    """Ray is started by the module's first Ray run (by ``train``, in this process) and stopped after its
    last test, so each test module that trains on Ray starts it once."""
    ray = pytest.importorskip("ray")
    yield
    if ray.is_initialized():
        ray.shutdown()


TINY = "configs/tiny.yaml"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, prefect_server):
    """`make run` as README.md gives it, once per session, on the tiny config (the Makefile's CONFIG
    variable) with its summary as JSON (RUN_FLAGS); yields the workspace and that summary. The
    pipeline and README tests share it: the whole pipeline is the suite's most expensive run."""
    import json

    from readme import argv, readme_command

    home = tmp_path_factory.mktemp("pipeline-home")
    env = dict(os.environ, LMFORGE_HOME=str(home), CONFIG=TINY, RUN_FLAGS="--json", PREFECT_API_URL=prefect_server)
    result = subprocess.run(argv(readme_command("make run")), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    # The summary is lmforge's last JSON line; a make run inside another make (make test) adds
    # "make[1]: Leaving directory" lines after it.
    summary = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
    yield {"home": home, "summary": json.loads(summary), "stdout": result.stdout}
    run_cli(["deploy", TINY, "--stop"], home)


# The evaluation tests' tiny model and workspace (test files that need other ones define their own).
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama (and its tokenizer) saved as the pipeline saves models; read-only."""
    from tiny_assets import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def ws(tmp_path):
    """A fresh workspace with curated/validation.parquet and sft/{train,test}.jsonl."""
    from tiny_assets import write_workspace_data

    from lmforge.core.workspace import Workspace

    ws = Workspace(tmp_path / "home").ensure()
    write_workspace_data(ws)
    return ws
