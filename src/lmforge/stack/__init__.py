"""The platform's roles as local processes: ``lmforge stack up | down | status``.

``roles`` says what each role runs and how it shows it is healthy, ``processes`` starts, records and stops
detached process groups, ``control`` is up/down/status. ``lmforge ui`` starts its servers through it.
"""

from __future__ import annotations

from typing import Any

from lmforge.stack.control import RoleState


def summary(states: dict[str, RoleState], started: list[str] | None = None) -> dict[str, Any]:
    """What `lmforge stack up|status` prints: each role's state, and the variables that point a client at it."""
    urls = {role: state.url for role, state in states.items() if state.state != "stopped"}
    env = {name: urls[role] for name, role in (("PREFECT_API_URL", "prefect-server"), ("MLFLOW_TRACKING_URI", "mlflow"),
                                               ("RAY_ADDRESS", "ray-head"), ("AWS_ENDPOINT_URL", "s3"))
           if urls.get(role)}
    if "RAY_ADDRESS" in env:  # a client of the head needs its authentication mode (and the token, if "token")
        env["RAY_AUTH_MODE"] = states["ray-head"].extra.get("auth_mode", "token")
    facts: dict[str, Any] = {"roles": {role: state.as_dict() for role, state in states.items()}, "env": env}
    if "prefect-server" in urls:
        facts["prefect_ui"] = str(urls["prefect-server"]).removesuffix("/api")
    if started is not None:
        facts["started"] = started
    return facts
