"""The local processes of ``lmforge stack``: started detached, recorded, checked and stopped by group.

Each role runs in a session (and process group) of its own, so it outlives the ``lmforge stack up`` that
started it and everything it forks (uvicorn workers, Ray's raylet and workers) can be stopped together.
A role is recorded in ``<home>/stack/<role>.json`` (pid, process group, port, URL, log) so that ``status``
and ``down`` work from any later command. Stopping never matches processes by name (``ray stop`` would stop
every Ray on the machine): a role's group is signalled, then any straggler whose command line names the
role's own marker (Ray's temp dir) is.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.core.errors import OrchestrationError
from lmforge.core.workspace import atomic_write_json


@dataclass(frozen=True)
class Record:
    """What ``<home>/stack/<role>.json`` keeps of one running role."""

    role: str
    pid: int
    pgid: int
    port: int
    url: str
    log: str
    command: list[str]
    # Kill stragglers of this role whose command line contains it (Ray's temp dir): "" for none.
    marker: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_or_free(port: int, flag: str) -> int:
    """``port`` when it is free on loopback, a free one for 0; a taken port is an error naming ``flag``."""
    if port == 0:
        return free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise OrchestrationError(f"port {port} on 127.0.0.1 is already in use",
                                     f"stop whatever listens there, or pass {flag} with another port (0: a free "
                                     "one)") from None
    return port


def die_with_parent() -> None:
    """In a child, before exec (Linux): SIGTERM when the starting process dies, even by SIGKILL; for
    `lmforge ui`, whose servers must not outlive it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def launch(command: list[str], log: Path, env: dict[str, str], tied: bool = False) -> subprocess.Popen:
    """Start ``command`` in a new session, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent if tied else None)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, under another user
    return True


def save(path: Path, record: Record) -> None:
    atomic_write_json(path, asdict(record))


def load(path: Path) -> Record | None:
    """The record at ``path``; None when there is none (never started, or stopped)."""
    try:
        return Record(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def stop(record: Record, grace_s: float = 15) -> None:
    """SIGTERM to the role's process group, SIGKILL after ``grace_s``; then its stragglers by marker."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pgid, sig)
        deadline = time.monotonic() + wait_s
        while _reaped_or_alive(record) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_alive(record.pgid):
            break
    for pid in processes_naming(record.marker) if record.marker else []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _reaped_or_alive(record: Record) -> bool:
    """Whether the role's group still has a process, after reaping its leader if it is this process's child
    and has exited (`lmforge ui` started it): an exited child stays a zombie, which counts as a group member,
    until its parent waits for it, and the stop would wait out its whole grace for nothing."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(record.pid, os.WNOHANG)
    return group_alive(record.pgid)


def processes_naming(marker: str) -> list[int]:
    """Processes of this user whose command line contains ``marker`` (a directory only this role uses)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if proc.info["uids"].real == os.getuid() and marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
    return [pid for pid in found if pid != os.getpid()]


def wait_until(check: Callable[[], bool], proc: subprocess.Popen | None, what: str, log: Path,
               timeout: float) -> None:
    """Poll ``check`` until it holds; a process that exits first, or a timeout, is an error naming the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None and proc.returncode != 0:
            raise OrchestrationError(f"{what} exited with code {proc.returncode} while starting",
                                     f"read its log, {log}: {tail(log)}")
        if check():
            return
        time.sleep(0.5)
    raise OrchestrationError(f"{what} was not healthy within {timeout:.0f} s",
                             f"read its log, {log} (a busy machine may need a longer --timeout): {tail(log)}")


def tail(log: Path, lines: int = 3, chars: int = 600) -> str:
    """The last lines of ``log`` joined on one line (at most ``chars``), for an error message."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    last = " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])
    return (last[-chars:] if len(last) > chars else last) or "(empty)"


def http_ok(url: str, timeout: float = 3) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
