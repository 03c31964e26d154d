"""This process's Ray: :func:`connect_ray` joins an existing cluster (``RAY_ADDRESS``, else the stage's
``ray_address`` setting) or starts a local Ray, the one choice every stage that uses Ray makes here.
Joining turns the failures a user causes (a wrong address, a missing or wrong token) into a ConfigError
that names the setting and the fix instead of Ray's traceback; a local start survives a busy machine
(:func:`start_local`).

Ray reads its token settings itself, in this process as in any driver: ``RAY_AUTH_MODE=token`` and
the token from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``. Nothing here touches the token, so it never reaches a config or a log.
"""

from __future__ import annotations

import os
from typing import Any

from lmforge.core.errors import ConfigError, OrchestrationError

TOKEN_FIX = ("give this process the cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or the file that "
             "RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token); `ray get-auth-token` prints it on a cluster node")


def connect_ray(address: str | None = None, *, log_to_driver: bool = True, **local: Any) -> bool:
    """Connect this process to Ray unless it already is: the cluster at ``RAY_ADDRESS``, else at ``address``
    (the stage's ``ray_address`` setting), else a local Ray of its own, started with ``local``'s
    ``ray.init`` keywords and no dashboard (PITFALLS). ``log_to_driver``: whether workers' output reaches
    this process. Returns True when this call connected: the caller then owns ``ray.shutdown()``."""
    import ray

    if ray.is_initialized():
        return False
    # The environment wins over the config: the cluster a deployment's environment names is where it runs.
    address = os.environ.get("RAY_ADDRESS") or address
    if address:
        join_cluster(address, log_to_driver=log_to_driver)
    else:
        start_local(include_dashboard=False, log_to_driver=log_to_driver, **local)
    return True


def join_cluster(address: str, **init_kwargs: Any) -> None:
    """``ray.init(address=address, **init_kwargs)``; raises ConfigError when the cluster cannot be
    reached or refuses this process's token."""
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, AuthenticationError) as exc:
        if _refused_token(exc):
            raise ConfigError(f"the Ray cluster at {address} refused this process: its Ray token is missing or "
                              "not the cluster's", TOKEN_FIX) from exc
        raise ConfigError(f"cannot reach a Ray cluster at {address} (RAY_ADDRESS, else platform.ray_address)",
                          "start the cluster (`ray start --head`) or correct the address; unset both for a local Ray") from exc


# Ray gives a new local node's raylet 30 s (a constant in ray/_private/node.py) to register with its GCS; on a
# machine whose cores are all busy that can pass, and a second try (the processes' imports now cached) passes.
START_TRIES = 3


def start_local(**init_kwargs: Any) -> None:
    """``ray.init(**init_kwargs)`` for a Ray of this process's own, tried again when the node's start timed
    out (a busy machine); raises OrchestrationError, with the fix, when every try did."""
    import ray

    for attempt in range(1, START_TRIES + 1):
        try:
            ray.init(**init_kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception for this timeout; every other one is re-raised
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            if attempt == START_TRIES:
                raise OrchestrationError(f"a local Ray did not start: its node did not register within Ray's 30 s, "
                                         f"{START_TRIES} times (the machine's cores are busy)",
                                         "run again when the machine is less busy, or start Ray once with "
                                         "`ray start --head` and set RAY_ADDRESS=auto so every command joins it") from exc


def on_this_node() -> dict[str, Any]:
    """``ray.remote`` options that keep a task on this process's node: for tasks that read or write
    this machine's disk (a cluster's other nodes cannot see it). Call with Ray initialized."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def _refused_token(exc: BaseException) -> bool:
    # ray.init wraps the refusal (ConnectionError from a RuntimeError), and the RuntimeError carries
    # the AuthenticationError only as the text of its last attempt's traceback.
    from ray.exceptions import AuthenticationError

    link: BaseException | None = exc
    while link is not None:
        if isinstance(link, AuthenticationError) or "InvalidAuthToken" in str(link):
            return True
        link = link.__cause__ or link.__context__
    return False
