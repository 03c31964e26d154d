"""Deploy stage: run a model as a local inference server process, probe it, record it.

    from lmforge.stages.deploy import deploy, stop
    result = deploy(cfg.serving, "models:/lmforge-demo@champion", ws, "lmforge-demo")
    stop(ws)

The server is a detached ``python -m lmforge.serving`` process (its own session, so it outlives
the caller and can be stopped as a process group); it keeps running after :func:`deploy` returns,
because it is the deployment. ``ws.serving_dir`` holds ``server.json`` (pid, endpoint, model), the
server's ``server.log`` and the ready file the server writes once it accepts connections. A new
deployment stops the previous one first. These are this machine's (a process id means nothing
elsewhere): on an object-store workspace they stay in its local side under the cache, while the
``deploy`` state hand-off (endpoint, model) is written to the store like every other stage's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.model.prompt import format_prompt

RECORD = "server.json"
READY = "ready.json"
LOG = "server.log"


@dataclass(frozen=True)
class DeployResult:
    """A running deployment and the answer to its probe request."""

    endpoint: str  # base URL, e.g. http://127.0.0.1:41234 (OpenAI routes live under /v1)
    model_name: str
    pid: int
    probe_prompt: str
    probe_response: str
    latency_s: float  # wall time of the probe request
    model_ref: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def deploy(cfg: ServingConfig, model_ref: str, ws: Workspace, model_name: str) -> DeployResult:
    """Start a server for ``model_ref`` (directory or ``models:/NAME@ALIAS``), probe it, record it."""
    serving = ws.serving_dir
    serving.mkdir(parents=True, exist_ok=True)
    stop(ws)
    ready = serving / READY
    ready.unlink(missing_ok=True)
    config_path = serving / "serving_config.json"
    atomic_write_json(config_path, cfg.model_dump(mode="json"))
    command = [
        sys.executable, "-m", "lmforge.serving", model_ref,
        "--model-name", model_name, "--ready-file", str(ready), "--serving-config", str(config_path),
    ]
    env = {**os.environ, "LMFORGE_HOME": ws.location}  # the server opens the same workspace (URL or path)
    with open(serving / LOG, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    # Recorded before it is ready, so a caller interrupted while waiting can still stop it.
    record = {"pid": proc.pid, "endpoint": None, "model_name": model_name, "model_ref": model_ref,
              "ready_file": str(ready), "log": str(serving / LOG), "started_at": time.time()}
    atomic_write_json(serving / RECORD, record)
    try:
        url = _wait_ready(proc, ready, serving / LOG, cfg.server.startup_timeout_s)
        response, latency = _probe(url, model_name, cfg.probe_prompt)
    except BaseException:
        stop(ws)
        raise
    atomic_write_json(serving / RECORD, {**record, "endpoint": url})
    result = DeployResult(url, model_name, proc.pid, cfg.probe_prompt, response, latency, model_ref)
    ws.write_state("deploy", result.as_dict())
    return result


def stop(ws: Workspace) -> bool:
    """Stop the server recorded in ``ws``; True when a live server of ours was stopped."""
    path = ws.serving_dir / RECORD
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
        pid, ready_file = int(record["pid"]), str(record["ready_file"])
    except (ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # unreadable record: nothing we can safely signal
        return False
    stopped = False
    # The pid may have been reused by an unrelated process since; only signal our own server.
    if _alive(pid) and _is_our_server(pid, ready_file):
        _terminate(pid)
        stopped = True
    path.unlink(missing_ok=True)
    (ws.serving_dir / READY).unlink(missing_ok=True)
    return stopped


def read_deployment(ws: Workspace) -> dict[str, Any] | None:
    """The recorded deployment (pid, endpoint, model_name, ...) or None."""
    path = ws.serving_dir / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def redeploy(ws: Workspace) -> DeployResult | None:
    """Start the running deployment again from its recorded model reference and serving config, so a
    ``models:/NAME@ALIAS`` deployment serves the version the alias names now (rollback uses this).
    None when no server of ours is running."""
    record = read_deployment(ws)
    if record is None or not (_alive(int(record["pid"])) and _is_our_server(int(record["pid"]), record["ready_file"])):
        return None
    cfg = ServingConfig.model_validate_json((ws.serving_dir / "serving_config.json").read_text())
    return deploy(cfg, str(record["model_ref"]), ws, str(record["model_name"]))


def _wait_ready(proc: subprocess.Popen, ready: Path, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            info = json.loads(ready.read_text())
            if info.get("pid") == proc.pid:
                return str(info["url"])
        code = proc.poll()
        if code is not None:
            raise ServingError(
                f"the server exited with code {code} before it was ready; end of {log}:\n{_tail(log)}",
                f"fix the problem the log shows (model path, port, config) and deploy again; full log: {log}",
            )
        time.sleep(0.1)
    raise ServingError(
        f"the server did not become ready within {timeout_s:.0f} s; end of {log}:\n{_tail(log)}",
        "raise serving.server.startup_timeout_s if the model is large, or read the log for the hang",
    )


def _probe(url: str, model_name: str, instruction: str) -> tuple[str, float]:
    """One greedy completion of the probe instruction, in the fine-tuning prompt format."""
    headers = {}
    keys = [k.strip() for k in os.environ.get("LMFORGE_API_KEY", "").split(",") if k.strip()]
    if keys:  # the server accepts any of several comma-separated keys; the probe uses the first
        headers["Authorization"] = f"Bearer {keys[0]}"
    body = {"model": model_name, "prompt": format_prompt(instruction), "temperature": 0}
    started = time.perf_counter()
    try:
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        raise ServingError(f"the probe request to {url} failed: {exc}",
                           "read server.log in the workspace's serving directory") from exc
    latency = time.perf_counter() - started
    if reply.status_code != 200:
        raise ServingError(
            f"the probe request to {url} answered {reply.status_code}: {reply.text[:500]}",
            "check serving.probe_prompt and the model's context window (serving.max_new_tokens)",
        )
    return reply.json()["choices"][0]["text"], latency


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        # Our own child that already exited stays a zombie until reaped; reap it here.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of another parent is not running either
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_server(pid: int, ready_file: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True)
        cmdline = out.stdout
    return "lmforge.serving" in cmdline and ready_file in cmdline


def _terminate(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (graceful uvicorn shutdown), SIGKILL after ``grace_s``."""
    def signal_group(sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    signal_group(signal.SIGKILL)
    while _alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
