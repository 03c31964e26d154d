"""The stack's Prefect deployments, registered on its process work pool: ``lmforge stack deploy [--config CONFIG]``.

- ``lmforge-pipeline/pipeline``: the pipeline (``continue_from: auto``), on demand;
- ``lmforge-pipeline/retrain``: the pipeline from the champion (``continue_from: champion``), on
  ``platform.schedule_cron`` and, with ``platform.retrain_on_new_data``, on ``lmforge.data.collected``: at most
  one run per ``platform.retrain_debounce_s``, and one at a time;
- ``lmforge-tune/tune``: the hyperparameter search, on demand;
- ``lmforge-deploy/deploy``: serve ``models:/NAME@ALIAS`` with the deploy stage, on demand;
- ``lmforge-collect/watch``: one incremental collect every ``platform.watch_interval_s`` (its schedule is
  active with ``platform.retrain_on_new_data``), emitting the event only when new documents arrived.

Each is ``flow.from_source(<this checkout>, entrypoint)``: the worker runs the flow from these files (the
pull step is ``set_working_directory``), so no image is built; ``infra/prefect.yaml`` registers the same
deployments inside the image with ``prefect deploy --all``. Registering again updates in place: Prefect
upserts a deployment by flow and name, replaces its schedules, and deletes the automations its triggers
own before creating them anew, so nothing is ever doubled. A deployment's parameters are the config given
here: after editing the YAML, run ``lmforge stack deploy`` again.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lmforge.config import PipelineConfig
from lmforge.core.errors import ConfigError, OrchestrationError
from lmforge.core.workspace import Workspace
from lmforge.stack.roles import POOL
from tasks.data import DATA_COLLECTED, workspace_resource

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "flows/pipeline.py:pipeline"
RETRAIN_TRIGGER = "lmforge-retrain-on-new-data"


@dataclass(frozen=True)
class Planned:
    """One deployment to register: what it runs, with which parameters, when."""

    entrypoint: str
    name: str
    parameters: dict[str, Any]
    description: str
    schedules: list[Any] = field(default_factory=list)  # prefect.schedules.Schedule
    triggers: list[Any] = field(default_factory=list)  # prefect.events.DeploymentEventTrigger
    # (limit, collision strategy): a watcher tick that finds the last one still running is dropped, a retrain
    # queued, so two never collect or train into one workspace at once.
    concurrency: tuple[int, str] | None = None


def plan(config: PipelineConfig, ws: Workspace) -> list[Planned]:
    """The deployments of this config and workspace (no server needed: what :func:`register` applies)."""
    from prefect.events import DeploymentEventTrigger
    from prefect.events.schemas.automations import Posture
    from prefect.schedules import Cron, Interval

    platform = config.platform
    try:
        weekly = Cron(platform.schedule_cron)
    except ValueError:
        raise ConfigError(f"platform.schedule_cron {platform.schedule_cron!r} is not a cron expression",
                          "give five fields, minute hour day-of-month month day-of-week, such as '0 3 * * 0' "
                          "(Sundays at 03:00)") from None
    whole = {"config": config.model_dump(mode="json")}
    watching = platform.retrain_on_new_data
    # Reactive with threshold 1: the first event fires at once; Prefect's next window opens when this one ends
    # and drops the events in between, so a burst of files starts one retrain, not one per file.
    on_new_data = DeploymentEventTrigger(
        name=RETRAIN_TRIGGER, enabled=watching, expect={DATA_COLLECTED},
        match={"prefect.resource.id": workspace_resource(ws)}, posture=Posture.Reactive, threshold=1,
        within=timedelta(seconds=platform.retrain_debounce_s))
    return [
        Planned(PIPELINE, "pipeline", {**whole, "continue_from": "auto"}, "The whole pipeline on the config."),
        Planned(PIPELINE, "retrain", {**whole, "continue_from": "champion"},
                "Retraining from the champion: on platform.schedule_cron, and when new documents arrive "
                "(platform.retrain_on_new_data).",
                schedules=[weekly], triggers=[on_new_data], concurrency=(1, "ENQUEUE")),
        Planned("flows/tune.py:tune_flow", "tune", whole, "Hyperparameter search over tune.space."),
        Planned("flows/deploy.py:deploy_flow", "deploy", whole, "Serve the registry's champion (or an alias)."),
        Planned("flows/collect.py:collect_flow", "watch", {"data": config.data.model_dump(mode="json")},
                "Collect; emits lmforge.data.collected when new documents arrived.",
                schedules=[Interval(platform.watch_interval_s, active=watching)], concurrency=(1, "CANCEL_NEW")),
    ]


def register_on_stack(config: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """`lmforge stack deploy`: register on this workspace's stack (else PREFECT_API_URL); what it prints."""
    from lmforge.stack.control import prefect_api

    api = prefect_api(ws)
    return {"prefect_api": api, "deployments": register(config, ws, api)}


def register(config: PipelineConfig, ws: Workspace, api_url: str, source: Path = ROOT) -> list[dict[str, Any]]:
    """Create or update every planned deployment on the Prefect server at ``api_url``, in the work pool
    ``lmforge`` (created if no worker made it yet); returns what each one is, as the server now has it."""
    import httpx
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    planned = plan(config, ws)
    with temporary_settings({PREFECT_API_URL: api_url}):
        try:
            ensure_pool()
            # Called outside an event loop, Prefect's dual sync/async methods return values, not coroutines
            # (their annotations name both): hence the casts here and in _apply. Each file is loaded once.
            flows = {entrypoint: cast("Flow[..., Any]", flow.from_source(source=str(source), entrypoint=entrypoint))
                     for entrypoint in dict.fromkeys(p.entrypoint for p in planned)}
            ids = {(p.entrypoint, p.name): _apply(p, flows[p.entrypoint]) for p in planned}
        except httpx.TransportError as exc:  # Prefect's client lets connection errors through as they are
            raise OrchestrationError(f"the Prefect server at {api_url} does not answer ({exc})",
                                     "start it with `lmforge stack up` (or point PREFECT_API_URL at a running "
                                     "server) and run `lmforge stack deploy` again") from None
        return [describe(ids[(p.entrypoint, p.name)]) for p in planned]


def ensure_pool() -> None:
    """The process work pool exists (the stack's worker creates it too; deploying before it started is fine)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # the worker made it meanwhile
                client.create_work_pool(WorkPoolCreate(
                    name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))


def _apply(planned: Planned, loaded: Flow[..., Any]) -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    limit = None
    if planned.concurrency:
        limit = ConcurrencyLimitConfig(limit=planned.concurrency[0], collision_strategy=planned.concurrency[1])
    deployment = cast("RunnerDeployment", loaded.to_deployment(
        name=planned.name, parameters=planned.parameters, description=planned.description,
        schedules=planned.schedules, triggers=planned.triggers, concurrency_limit=limit, tags=["lmforge"],
        work_pool_name=POOL))
    return deployment.apply(work_pool_name=POOL)


def describe(deployment_id: Any) -> dict[str, Any]:
    """A registered deployment as the server has it: name, schedules, and its triggers' automations."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        flow_name = client.read_flow(deployment.flow_id).name
        automations = client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")
    schedules = []
    for item in deployment.schedules:
        spec = item.schedule
        when = getattr(spec, "cron", None) or f"every {spec.interval.total_seconds():.0f} s"  # type: ignore[union-attr] # cron or interval, the two kinds planned
        schedules.append({"schedule": when, "active": item.active})
    triggers = [{"name": a.name, "enabled": a.enabled, "expect": sorted(a.trigger.expect),  # type: ignore[union-attr] # event triggers only
                 "within_s": a.trigger.within.total_seconds()}  # type: ignore[union-attr] # event triggers only
                for a in automations]
    return {"name": f"{flow_name}/{deployment.name}", "id": str(deployment_id), "work_pool": deployment.work_pool_name,
            "schedules": schedules, "triggers": triggers}
