"""Helpers of the slow tests that drive `lmforge stack` end to end (tests/integration/test_stack_*.py): a tiny
config watching a local directory, deployments registered through the CLI, flow runs started and awaited on
the stack's Prefect server, files dropped in whole, a steady client load, and the check that nothing is left.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import REPO, TINY, run_cli
from readme import argv


def last_json(result: subprocess.CompletedProcess) -> dict:
    """The command's last stdout line as JSON (its --json summary); a failed command fails with its output."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def stack_config(tmp_path: Path, name: str, watched: Path, sections: dict[str, Any] | None = None,
                 **platform: object) -> str:
    """The tiny config plus a `local` source on ``watched``, the given platform keys and other ``sections``
    (each replacing the tiny config's section of that name)."""
    config = yaml.safe_load((REPO / TINY).read_text())
    config["data"]["sources"].append({"type": "local", "paths": [str(watched)]})
    config["platform"] = platform
    config.update(sections or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def deploy(command: str, config: str, home: Path, env: dict[str, str] | None = None) -> dict[str, dict]:
    """README's ``command`` (the caller's ``readme_command("lmforge stack deploy --config CONFIG")``, so that
    tests/e2e/test_readme.py sees which test runs it) on ``config``: the registered deployments by name."""
    facts = last_json(run_cli(argv(command, CONFIG=config)[1:], home, env=env, timeout=300))
    return {d["name"]: d for d in facts["deployments"]}


def write_docs(directory: Path, batch: str, count: int) -> None:
    """``count`` new text files, each moved in whole (a collect never sees half a file)."""
    for i in range(count):
        text = f"Batch {batch}, note {i}: " + " ".join(f"the {batch}{i} pipeline retrains word{j}" for j in range(60))
        tmp = directory.parent / f".{batch}{i}.tmp"
        tmp.write_text(text)
        tmp.rename(directory / f"{batch}-{i}.txt")


def runs(api: str, deployment_id: str) -> list[dict]:
    """The deployment's runs that something started (its cron's future runs, created ahead, left out)."""
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return [r for r in httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json() if not r["auto_scheduled"]]


def start(api: str, deployment_id: str, parameters: dict) -> dict:
    """A run of the deployment; a SQLite server on a loaded machine may answer 5xx for a moment: asked again."""
    for _ in range(5):
        reply = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters},
                           timeout=60)
        if reply.status_code < 500:
            break
        time.sleep(5)
    assert reply.status_code == 201, reply.text
    return reply.json()


def events(api: str, resource: str) -> list[dict]:
    body = {"filter": {"event": {"name": ["lmforge.data.collected"]}, "resource": {"id": [resource]}}, "limit": 50}
    return httpx.post(f"{api}/events/filter", json=body, timeout=30).json()["events"]


def wait(what: str, check: Callable[[], Any], timeout: float, every: float = 3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def finished(api: str, run_id: str, timeout: float) -> dict:
    def final() -> dict | None:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None
    return wait(f"flow run {run_id} to finish", final, timeout, every=5)


def processes_of(home: Path) -> list[int]:
    """Every process whose environment names this LMFORGE_HOME (the stack's roles, flow runs, Ray's workers)."""
    import psutil

    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("LMFORGE_HOME") == str(home):
                left.append(proc.info["pid"])
        except psutil.Error:
            continue
    return left


class SteadyLoad:
    """One client sending completions back to back (``pause`` s apart); every status code (or exception) is kept."""

    def __init__(self, endpoint: str, model: str, pause: float = 0.0) -> None:
        self.endpoint, self.model, self.pause = endpoint, model, pause
        self.outcomes, self._stop = Counter[str](), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": self.model, "prompt": "The quick", "max_tokens": 4, "temperature": 0}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    self.outcomes[str(client.post(f"{self.endpoint}/v1/completions", json=body).status_code)] += 1
                except httpx.HTTPError as exc:
                    self.outcomes[type(exc).__name__] += 1
                self._stop.wait(self.pause)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

