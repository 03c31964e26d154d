"""Every command in README.md, executed. The commands are read out of the README's ```bash and
```python blocks (as LitGPT's tests/test_readme.py does), so the README cannot drift from what works.

Placeholders are filled with real things of one workspace: ``CONFIG`` is ``configs/tiny.yaml``,
``RUN_ID`` a run this test stopped with ``kill -9`` after a checkpoint, ``path/to/model_dir`` the model
that ``make run`` trained, ``path/to/base`` and the adapters its base and LoRA adapter; every server
gets a free loopback port instead of 8000. ``COMMANDS`` says how each README command runs here; a
README command missing from it fails :func:`test_every_readme_command_has_a_runner`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import REPO, TINY, free_port, wait_http
from readme import argv, python_snippet, readme_command, readme_commands

KUBERNETES = ("not here: needs a Kubernetes cluster with the KubeRay operator; tests/integration/test_infra_manifests.py "
              "validates these manifests offline against KubeRay's CRD schemas")

DOCKER = ("not here: needs a Docker engine with the compose plugin; tests/integration/test_compose.py validates "
          "docker-compose.yml and docker/Dockerfile offline (the Compose schema, hadolint, the same commands as lmforge stack)")

# How each README command runs here: "run" executes it in this file (placeholders filled), a test
# file's name: that file runs it, "dry-run" asks make what it would do, "not here" says why this
# machine cannot run it at all.
COMMANDS = {
    "make run": "tests/conftest.py",  # the `pipeline` fixture, on configs/tiny.yaml (the CONFIG variable)
    "make test": "dry-run",  # this suite is what it runs
    "python3.11 -m venv .venv": "run",
    ".venv/bin/pip install torch --index-url <your CUDA wheel index, e.g. the cu130 index of PyTorch>":
        "not here: needs a CUDA wheel index, which this offline CPU machine cannot reach",
    "make run TORCH_SPEC=torch": "dry-run",  # the install recipe it would run, with the user's torch spec
    "lmforge collect tests/fixtures/curate/config.yaml": "run",
    "lmforge curate tests/fixtures/curate/config.yaml --json": "run",
    "lmforge validate tests/fixtures/curate/config.yaml": "run",
    "python -m lmforge.train CONFIG --resume RUN_ID": "run",
    "lmforge train CONFIG --resume [RUN_ID]": "tests/integration/test_train_fault_tolerance.py",
    "lmforge tune CONFIG [--json]": "tests/integration/test_tune.py",
    "lmforge tune CONFIG --resume [TUNE_ID] [--json]": "tests/integration/test_tune_search_resume.py",
    "lmforge config show configs/tiny.yaml": "run",
    "lmforge config schema": "run",
    "lmforge ui [CONFIG] [--prefect-port 4200] [--mlflow-port 5000]": "tests/e2e/test_ui.py",
    "lmforge stack up [--s3] [--json]": "tests/integration/test_stack.py",
    "lmforge stack status [--json]": "tests/integration/test_stack.py",
    "lmforge stack down [--json]": "tests/integration/test_stack.py",
    "lmforge stack deploy --config CONFIG [--json]": "tests/integration/test_stack_deployments.py",
    "lmforge serve models:/lmforge-demo@champion [--host 127.0.0.1] [--port 8000]": "run",
    "lmforge serve path/to/model_dir": "run",
    "lmforge serve path/to/base --adapter sql=runs/sql-lora --adapter docs=path/to/peft_adapter": "run",
    "lmforge export-onnx path/to/model_dir onnx-model": "run",
    "lmforge serve onnx-model": "run",
    "python: openai client": "run",
    "lmforge rollback [MODEL] [--json]": "tests/integration/test_promotion.py",
    # A Ray cluster: two real nodes on this machine, token auth on, lmforge train pinned to node 2.
    "export RAY_AUTH_MODE=token": "tests/integration/test_ray_cluster.py",
    "ray get-auth-token --generate": "tests/integration/test_ray_cluster.py",
    "ray start --head --port=6379": "tests/integration/test_ray_cluster.py",
    "ray start --address=HEAD_IP:6379 [--resources='{\"node2\": 1}']": "tests/integration/test_ray_cluster.py",
    "RAY_ADDRESS=HEAD_IP:6379 lmforge train CONFIG": "tests/integration/test_ray_cluster.py",
    # The container stack: this machine has no Docker engine; the file, the images and the commands are checked
    # offline, and the same roles run as processes in tests/integration/test_stack.py.
    "cp .env.example .env": "tests/integration/test_compose.py",
    "docker compose up -d": DOCKER,
    "docker compose --profile serve up -d serve": DOCKER,
    "docker compose down": DOCKER,
    "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d": DOCKER,
    "kubectl apply -f infra/kuberay/secrets.yaml": KUBERNETES,
    "kubectl apply -f infra/kuberay/raycluster.yaml": KUBERNETES,
    "kubectl apply -f infra/kuberay/rayjob.yaml": KUBERNETES,
}


def test_every_readme_command_has_a_runner():
    commands = readme_commands()
    assert set(commands) == set(COMMANDS), (
        f"README commands without a runner here: {sorted(set(commands) - set(COMMANDS))}; "
        f"runners of commands the README no longer has: {sorted(set(COMMANDS) - set(commands))}")
    for command, runner in COMMANDS.items():
        if runner.startswith("tests/"):  # that file takes the command from the README, not a copy
            prefix = command.split(" [")[0]
            assert f'readme_command("{prefix}")' in (REPO / runner).read_text(), (command, runner)


# ---------------------------------------------------------------- make run, and what it leaves


def _env(home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, LMFORGE_HOME=str(home), **extra)


@pytest.fixture(scope="module")
def made(pipeline):
    """What the README's `make run` (conftest's ``pipeline``) trained: the model, its run, its base."""
    train = json.loads((pipeline["home"] / "state" / "train.json").read_text())
    model_dir = Path(train["model_dir"])
    return {**pipeline, "model_dir": model_dir, "run_dir": model_dir.parent}


@pytest.fixture(scope="module")
def home(made) -> Path:
    return made["home"]


def test_make_run_registers_promotes_and_deploys(made):
    summary = made["summary"]
    assert summary["version"] == "1" and summary["aliases"] == ["champion"]
    assert summary["endpoint"].startswith("http://127.0.0.1:")
    assert (made["model_dir"] / "config.json").is_file()


def test_make_test_and_the_gpu_spec_are_what_make_would_run():
    dry = subprocess.run(["make", "-n", *argv(readme_command("make test"))[1:]], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "pytest" in dry.stdout, dry.stdout + dry.stderr
    gpu = argv(readme_command("make run TORCH_SPEC="))
    dry = subprocess.run(["make", "-n", "-B", *gpu[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    # The user's spec, satisfied by the torch installed (no index asked) before PyTorch's CPU index is tried.
    assert re.search(r"pip install -q --no-index --no-deps \"?torch\"? ", dry.stdout), dry.stdout
    assert "lmforge run" in dry.stdout


def test_a_fresh_venv_for_a_gpu_machine(tmp_path):
    result = subprocess.run(argv(readme_command("python3.11 -m venv")), cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".venv" / "bin" / "python").exists()


def test_curation_fixture_commands(tmp_path):
    env = _env(tmp_path / "home")
    for prefix in ("lmforge collect tests/fixtures", "lmforge curate tests/fixtures",
                   "lmforge validate tests/fixtures"):
        result = subprocess.run(argv(readme_command(prefix)), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (prefix, result.stderr[-3000:])
        if "--json" in prefix or "--json" in readme_command(prefix):
            facts = json.loads(result.stdout.strip().splitlines()[-1])
            assert 0 < facts["documents_out"] < facts["documents_in"]


def test_config_commands():
    shown = subprocess.run(argv(readme_command("lmforge config show")), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "hidden_size: 64" in shown.stdout, shown.stdout + shown.stderr
    schema = subprocess.run(argv(readme_command("lmforge config schema")), cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert schema.returncode == 0 and "training" in json.loads(schema.stdout)["properties"]


def test_resume_continues_a_killed_run(made, tmp_path):
    """`python -m lmforge.train CONFIG --resume RUN_ID` after a real kill -9 mid-run, in a workspace
    holding a copy of the pipeline's data and tokenizer (the pipeline's own runs stay as they are)."""
    home = tmp_path / "home"
    for part in ("data", "tokenizer"):
        shutil.copytree(made["home"] / part, home / part)
    config = tmp_path / "resumable.yaml"
    short = (REPO / TINY).read_text().replace("pretrain: {steps: 30", "pretrain: {steps: 12").replace(
        "finetune: {steps: 20", "finetune: {steps: 8")
    assert "  logging: {every: 5}" in short  # the line the resumable settings replace
    config.write_text(short.replace("  logging: {every: 5}", "  logging: {every: 1}\n  checkpointing: {every: 4}\n"
                                    "  placement: {use_ray: false}"))
    started = subprocess.Popen([sys.executable, "-m", "lmforge.train", str(config), "--run-name", "killed"],
                               cwd=REPO, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoints = home / "checkpoints"
    deadline = time.monotonic() + 300
    # latest.json is written last (train/checkpoint.py): a checkpoint still in its temporary
    # directory, or renamed but not yet pointed at, is not one to resume from.
    while not list(checkpoints.glob("killed-*/latest.json")) and started.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(started.pid, signal.SIGKILL)
    started.wait(timeout=30)
    run_ids = [p.name for p in checkpoints.glob("killed-*")]
    assert len(run_ids) == 1, "the killed run left its checkpoints"
    command = argv(readme_command("python -m lmforge.train"), CONFIG=str(config), RUN_ID=run_ids[0])
    resumed = subprocess.run(command, cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    facts = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert facts["run_id"] == run_ids[0] and Path(facts["model_dir"]).is_dir()


# ---------------------------------------------------------------- long-running commands


@contextmanager
def running(command: list[str], env: dict[str, str], health: str, cwd: Path = REPO):
    with open(Path(env["LMFORGE_HOME"]) / f"readme-{free_port()}.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(health, timeout=180, proc=proc)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _complete(port: int, model: str) -> None:
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": model, "prompt": "The json module", "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_serve_from_the_registry_and_the_openai_snippet(made, home):
    port = free_port()
    command = argv(readme_command("lmforge serve models:/"), **{"8000": str(port)})
    with running(command, _env(home), f"http://127.0.0.1:{port}/health"):
        snippet = python_snippet().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        # The snippet's last line is the request; the client raises on any error reply.
        result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        _complete(port, "lmforge-demo")
        from openai import OpenAI

        chat = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none").chat.completions.create(
            model="lmforge-demo", max_tokens=4, messages=[{"role": "user", "content": "What does `os.getcwd` do?"}])
        assert chat.choices[0].message.role == "assistant"


def test_serve_a_model_directory_and_adapters(made, home):
    port = free_port()
    model = [*argv(readme_command("lmforge serve path/to/model_dir"), **{"path/to/model_dir": str(made["model_dir"])}),
             "--port", str(port)]
    with running(model, _env(home), f"http://127.0.0.1:{port}/health"):
        _complete(port, made["model_dir"].name)
    adapter = str(made["run_dir"] / "adapter")
    port = free_port()
    with_adapters = [*argv(readme_command("lmforge serve path/to/base"), **{
        "path/to/base": str(made["run_dir"] / "base"), "runs/sql-lora": adapter,
        "path/to/peft_adapter": adapter}), "--port", str(port)]
    with running(with_adapters, _env(home), f"http://127.0.0.1:{port}/health"):
        _complete(port, "sql")
        _complete(port, "docs")


def test_export_onnx_and_serve_it(made, home, tmp_path):
    export = argv(readme_command("lmforge export-onnx"), **{"path/to/model_dir": str(made["model_dir"])})
    result = subprocess.run(export, cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    port = free_port()
    serve = [*argv(readme_command("lmforge serve onnx-model")), "--port", str(port)]
    with running(serve, _env(home), f"http://127.0.0.1:{port}/health", cwd=tmp_path):
        _complete(port, "onnx-model")
