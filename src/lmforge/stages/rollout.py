"""The local-process rollout's moving parts: start a server or the front proxy, wait, probe, switch, drain, stop.

``stages/deploy.py`` decides what to do (nothing, a first start, a roll); this module does each step
on this machine. Every process is started detached (its own session, so it outlives the caller and
is stopped as a process group) with ``LMFORGE_HOME`` pointing at the same workspace, and writes a
ready file ``{url, pid}`` once it accepts connections. A pid is only ever signalled after its
command line shows that it is ours (it names its own ready file): a recorded pid may have been
reused by an unrelated process since.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_write_text
from lmforge.model.prompt import format_prompt
from lmforge.serving.api import PROXY_ADMIN_PATH, PROXY_TOKEN_HEADER


def spawn(command: list[str], log: Path, ws: Workspace) -> subprocess.Popen:
    """``command`` detached in a session of its own, its output in ``log``."""
    env = {**os.environ, "LMFORGE_HOME": ws.location}  # it opens the same workspace (URL or path)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def server_command(model_ref: str, model_name: str, ready: Path, config: Path, release: Path) -> list[str]:
    """The model server behind the proxy: always loopback, a free port of its own."""
    return [sys.executable, "-m", "lmforge.serving", model_ref, "--model-name", model_name, "--host", "127.0.0.1",
            "--port", "0", "--ready-file", str(ready), "--serving-config", str(config), "--release-file", str(release)]


def proxy_command(upstream: str, host: str, port: int, ready: Path, config: Path, token_file: Path) -> list[str]:
    return [sys.executable, "-m", "lmforge.serving.api.proxy", "--upstream", upstream, "--host", host, "--port",
            str(port), "--ready-file", str(ready), "--serving-config", str(config), "--token-file", str(token_file)]


def new_token(path: Path) -> str:
    """A fresh admin token for the proxy, in a file only this user can read."""
    token = secrets.token_urlsafe(32)
    atomic_write_text(path, token + "\n")
    path.chmod(0o600)
    return token


def wait_ready(proc: subprocess.Popen, ready: Path, log: Path, timeout_s: float, what: str) -> str:
    """The URL ``proc`` writes to ``ready`` once listening; its log's tail if it exits or hangs first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            info = json.loads(ready.read_text())
            if info.get("pid") == proc.pid:
                return str(info["url"])
        code = proc.poll()
        if code is not None:
            raise ServingError(
                f"the {what} exited with code {code} before it was ready; end of {log}:\n{tail(log)}",
                f"fix the problem the log shows (model path, port, config) and deploy again; full log: {log}",
            )
        time.sleep(0.1)
    raise ServingError(
        f"the {what} did not become ready within {timeout_s:.0f} s; end of {log}:\n{tail(log)}",
        "raise serving.server.startup_timeout_s if the model is large, or read the log for the hang",
    )


def auth_headers() -> dict[str, str]:
    keys = [k.strip() for k in os.environ.get("LMFORGE_API_KEY", "").split(",") if k.strip()]
    # The server accepts any of several comma-separated keys; the deploy uses the first.
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def probe(url: str, model_name: str, instruction: str) -> tuple[str, float]:
    """One greedy completion of the probe instruction, in the fine-tuning prompt format."""
    body = {"model": model_name, "prompt": format_prompt(instruction), "temperature": 0}
    started = time.perf_counter()
    try:
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=auth_headers(), timeout=120)
    except httpx.HTTPError as exc:
        raise ServingError(f"the probe request to {url} failed: {exc}",
                           "read the server's log in the workspace's serving directory") from exc
    latency = time.perf_counter() - started
    if reply.status_code != 200:
        raise ServingError(
            f"the probe request to {url} answered {reply.status_code}: {reply.text[:500]}",
            "check serving.probe_prompt and the model's context window (serving.max_new_tokens)",
        )
    return reply.json()["choices"][0]["text"], latency


def health(url: str) -> dict[str, Any]:
    """``GET /health`` of ``url``; a ServingError when it does not answer 200."""
    try:
        reply = httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as exc:
        raise ServingError(f"{url}/health did not answer: {exc}", "read the server's log, then deploy again") from exc
    if reply.status_code != 200:
        raise ServingError(f"{url}/health answered {reply.status_code}: {reply.text[:300]}",
                           "read the server's log, then deploy again")
    return dict(reply.json())


def admin(endpoint: str, token: str, action: str, payload: dict[str, Any], timeout_s: float = 10) -> dict[str, Any]:
    """One call to the proxy's admin routes (switch, drain, state)."""
    # The admin routes answer loopback only: a proxy bound to 0.0.0.0 is still reached on 127.0.0.1 here.
    try:
        reply = httpx.post(f"{endpoint}{PROXY_ADMIN_PATH}{action}", json=payload, headers={PROXY_TOKEN_HEADER: token},
                           timeout=timeout_s + 5)
    except httpx.HTTPError as exc:
        raise ServingError(f"the deployment's proxy at {endpoint} did not answer {action}: {exc}",
                           "stop the deployment (`lmforge deploy --stop`) and deploy again") from exc
    if reply.status_code != 200:
        raise ServingError(f"the proxy at {endpoint} refused {action}: {reply.status_code} {reply.text[:300]}",
                           "stop the deployment (`lmforge deploy --stop`) and deploy again")
    return dict(reply.json())


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def alive(pid: int) -> bool:
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


def ours(pid: int, module: str, ready_file: str) -> bool:
    """Whether ``pid`` is alive and is the ``python -m MODULE`` process that writes ``ready_file``."""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS): ask ps
        cmdline = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True).stdout
    return f"-m {module} " in cmdline and ready_file in cmdline


def terminate(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group (a graceful uvicorn shutdown drains it), SIGKILL after ``grace_s``."""
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
        if not alive(pid):
            return
        time.sleep(0.05)
    signal_group(signal.SIGKILL)
    while alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
