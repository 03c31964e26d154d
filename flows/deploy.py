"""The lmforge-deploy flow: serve a registered model (``models:/NAME@ALIAS``) with the deploy stage.

``lmforge stack deploy`` registers it as ``lmforge-deploy/deploy`` (no schedule): started from the Prefect
UI or ``prefect deployment run lmforge-deploy/deploy``, it serves the registry's alias on the machine of
the worker that runs it, as ``lmforge deploy CONFIG`` does.
"""

# No `from __future__ import annotations` here: Prefect builds its parameter model from the
# signature at run time and must see real classes, not strings.
from typing import Any

from prefect import flow

from lmforge.config import PipelineConfig
from tasks.registry import deploy_task


@flow(name="lmforge-deploy", log_prints=True, description=__doc__)
def deploy_flow(config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen, so one shared default is safe
                alias: str | None = None) -> dict[str, Any]:
    """Serve ``models:/<registry.model_name>@<alias>``; returns the deployment's endpoint and probe.

    Args:
        config: The pipeline config (its serving and registry sections).
        alias: The registry alias to serve; empty: registry.alias (the champion).
    """
    name = config.registry.model_name
    return deploy_task(config.serving, f"models:/{name}@{alias or config.registry.alias}", name)
