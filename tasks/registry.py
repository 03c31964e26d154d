"""Prefect tasks for MLflow registration, promotion by rule, and deployment."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lmforge.config import PipelineConfig, PlatformConfig, RegistryConfig, ServingConfig
from lmforge.core.workspace import Workspace
from tasks._publish import announce, publish


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(config: PipelineConfig, trained: dict[str, Any], evaluated: dict[str, Any],
                  flow_run_id: str | None) -> dict[str, Any]:
    announce("register", "logging to MLflow, registering a version")
    from lmforge.stages.register import register_trained

    ws = Workspace.from_env()
    result = register_trained(config, ws, trained, evaluated, flow_run_id)
    publish("register", result, f"registered {result['name']} version {result['version']}")
    return result


@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def promote_task(cfg: RegistryConfig, platform: PlatformConfig, version: str) -> dict[str, Any]:
    announce("promote", "applying the promotion rule")
    from lmforge.stages.promote import promote

    result = promote(cfg, platform, Workspace.from_env(), version).as_dict()
    publish("promote", result, result["reason"])
    return result


@task(name="settle-approval", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def settle_approval_task(cfg: RegistryConfig, platform: PlatformConfig, version: str,
                         answer: dict[str, Any]) -> dict[str, Any]:
    """Record the answer of the approval form (tasks/approval.py): promote or reject the pending version."""
    announce("promote", "recording the approval")
    from lmforge.stages.promote import settle_approval

    result = settle_approval(cfg, platform, Workspace.from_env(), version, approved=answer["approved"],
                             comment=answer.get("comment", ""), by=answer.get("by"), via=answer.get("via", "prefect"),
                             timed_out=answer.get("timed_out", False)).as_dict()
    publish("promote", result, result["reason"])
    return result


@task(name="deploy", retries=1, cache_policy=NO_CACHE)
def deploy_task(cfg: ServingConfig, model_uri: str, model_name: str) -> dict[str, Any]:
    announce("deploy", "serving the champion")
    from lmforge.stages.deploy import deploy

    result = deploy(cfg, model_uri, Workspace.from_env(), model_name).as_dict()
    publish("deploy", result, f"serving at {result['endpoint']}")
    return result
