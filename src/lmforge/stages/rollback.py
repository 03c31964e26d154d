"""The rollback stage: move the alias (``champion``) back to the version that held it before.

Run it with ``lmforge rollback [MODEL] [--json]``. The previous holder comes from the alias history
that every promotion writes on the registered model (:mod:`lmforge.tracking.alias_history`); the
rollback is recorded on both versions (``lmforge.rollback.*`` tags and their model cards) and pops
the history, so a second rollback goes one further back. If this workspace's deployment serves
``models:/MODEL@ALIAS``, it rolls to the restored version the way ``lmforge deploy`` rolls (start the
new server, probe, switch the stable endpoint, drain and stop the old one: ``stages/deploy.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.core.errors import RegistryError
from lmforge.core.workspace import Workspace
from lmforge.serving.ray_serve import read_app
from lmforge.stages.deploy import read_deployment, redeploy
from lmforge.tracking.alias_history import history_tag, now, read_history, write_history
from lmforge.tracking.card import publish_card
from lmforge.tracking.mlflow_tracker import describe_registry, mlflow_client
from lmforge.tracking.model_uris import version_by_alias


@dataclass(frozen=True)
class RollbackResult:
    name: str
    alias: str
    from_version: str
    to_version: str
    deployment: dict[str, Any]  # what happened to this workspace's server: redeployed, not following, none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rollback(cfg: RegistryConfig, platform: PlatformConfig | None, ws: Workspace,
             model_name: str | None = None) -> RollbackResult:
    """Point ``cfg.alias`` of ``model_name`` (default ``cfg.model_name``) at its previous holder."""
    name, alias = model_name or cfg.model_name, cfg.alias
    client = mlflow_client(ws, platform)
    current = version_by_alias(client, name, alias)
    if current is None:
        raise RegistryError(f"model {name!r} has no alias {alias!r} to roll back ({describe_registry(ws, platform, name)})",
                            "promote a version first (`lmforge promote CONFIG`), or name another model: "
                            "`lmforge rollback MODEL`")
    held = str(current.version)
    entries = read_history(client, name, alias)
    while entries and (entries[-1]["version"] == held or not _exists(client, name, entries[-1]["version"])):
        entries.pop()
    if not entries:
        raise RegistryError(
            f"{name}@{alias} is v{held} and no earlier holder of {alias!r} is recorded "
            f"(registered-model tag {history_tag(alias)})",
            f"there is nothing to roll back to; promote another version (`lmforge promote CONFIG --approve VERSION` "
            f"applies the rules), or serve one pinned: `lmforge deploy CONFIG --model models:/{name}/VERSION`",
        )
    target = str(entries[-1]["version"])
    client.set_registered_model_alias(name, alias, target)
    write_history(client, name, alias, entries)
    at = now()
    for version, tags in ((held, {"demoted_to": target}), (target, {"restored_from": held})):
        for key, value in {**tags, "at": at}.items():
            client.set_model_version_tag(name, version, f"lmforge.rollback.{key}", value)
        publish_card(client, name, version)
    result = RollbackResult(name, alias, held, target, _follow(ws, name, alias))
    ws.write_state("rollback", result.as_dict())
    return result


def _exists(client: Any, name: str, version: str) -> bool:
    """Whether ``version`` is still registered (a deleted one cannot take the alias back)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
        return True
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise


def _follow(ws: Workspace, name: str, alias: str) -> dict[str, Any]:
    """Redeploy this workspace's server when it serves the alias; say why not otherwise."""
    uri = f"models:/{name}@{alias}"
    record = read_deployment(ws) or read_app(ws)  # a local deployment, or a Ray Serve application
    if record is None:
        return {"action": "none", "detail": "no deployment in this workspace"}
    if record.get("model_ref") != uri:
        return {"action": "left", "detail": f"the deployment serves {record.get('model_ref')}, not {uri}"}
    deployed = redeploy(ws)
    if deployed is None:
        return {"action": "none", "detail": f"the deployment of {uri} is not running; `lmforge deploy` starts it"}
    # "rolled": the new version started, passed its probe and took over the same endpoint before the old stopped.
    return {"action": "redeployed", "rollout": deployed.action, "endpoint": deployed.endpoint, "pid": deployed.pid,
            "version": deployed.version}
