"""`lmforge run` when Prefect's temporary server cannot start: an `error:`/`fix:` message, no traceback,
no server left behind. Both are provoked for real (a Prefect home under a file; a start-up timeout the user
set too short for any machine), and both fail in seconds, before the pipeline does any work."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import run_cli


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: " in result.stderr and "fix: " in result.stderr


def test_an_unwritable_prefect_home_is_an_error_with_its_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(["run"], tmp_path / "home", env={"PREFECT_HOME": str(blocker / "prefect")}, timeout=120)
    _no_traceback(result)
    assert f"Prefect's home {blocker / 'prefect'} cannot be written" in result.stderr
    assert "set PREFECT_HOME" in result.stderr


def test_a_server_that_does_not_start_in_time_is_an_error_with_its_fix(tmp_path):
    home = tmp_path / "prefect"
    # The user's value wins over lmforge's default: 1 s is too short for any fresh database.
    result = run_cli(["run"], tmp_path / "home",
                     env={"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"},
                     timeout=120)
    _no_traceback(result)
    assert "temporary server did not start within 1 s" in result.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300" in result.stderr
    assert _processes_with(f"PREFECT_HOME={home}".encode()) == []


def _processes_with(variable: bytes) -> list[int]:
    """Pids of the live processes whose environment holds ``variable`` (NAME=VALUE)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue  # gone meanwhile, or another user's
    return found
