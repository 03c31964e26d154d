"""The Prefect API a flow run reports to, started before the first flow when none is configured.

With no ``PREFECT_API_URL``, Prefect starts a temporary server on the first client call and waits
``server.ephemeral.startup_timeout_seconds`` (default 20 s) for it to create its SQLite database and
answer. On a busy 2-core machine a fresh database took longer than that, and the flow died with a raw
``RuntimeError`` traceback. ``lmforge run`` therefore starts that same temporary server itself, first:
with the time a busy machine needs unless the user set the timeout, and with every start-up failure
turned into an ``OrchestrationError`` that names the cause and the fix. Prefect's own client then finds
the server already running (one temporary server per process) and uses it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmforge.core.errors import OrchestrationError

# A fresh database took 14 s to answer on a 2-core machine at load average 4 (measured), past Prefect's 20 s
# when busier; the bound is generous because a slow start costs seconds, while a timeout fails the whole run.
BUSY_MACHINE_STARTUP_S = 120
TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def startup_timeout() -> int:
    """Seconds to wait for the temporary server: the user's own value (environment, profile, prefect.toml)
    when set anywhere, else ``BUSY_MACHINE_STARTUP_S``."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return ephemeral.startup_timeout_seconds
    return BUSY_MACHINE_STARTUP_S


def check_prefect_home() -> Path:
    """``PREFECT_HOME`` exists and takes files (the temporary server's database lives there): a home it
    cannot write otherwise shows up only as a start-up timeout."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OrchestrationError(
            f"Prefect's home {home} cannot be written ({exc.strerror or exc}): its temporary server keeps its "
            "database there",
            "set PREFECT_HOME to a writable directory (lmforge's default is <LMFORGE_HOME>/prefect), or point "
            "PREFECT_API_URL at a running Prefect server (`lmforge stack up` starts one)") from None
    return home


def ensure_api() -> str | None:
    """Start Prefect's temporary server for this process unless ``PREFECT_API_URL`` names a server;
    returns the API URL of the temporary server, or None when a configured server is used."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None  # a configured server (or Prefect's own error for having none) is the user's choice
    check_prefect_home()
    from prefect.server.api.server import SubprocessASGIServer

    timeout = startup_timeout()
    server = SubprocessASGIServer()
    try:
        server.start(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - Prefect raises a bare RuntimeError (or an HTTP error) on any failed start
        server.stop()  # its process may still be starting: leave none behind
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OrchestrationError(
            f"Prefect's temporary server did not start within {timeout} s ({first_line[:300]})",
            f"give it longer ({TIMEOUT_SETTING}=300), or start a lasting server once with `lmforge stack up` "
            "and set PREFECT_API_URL to the URL it prints") from None
    return server.api_url
