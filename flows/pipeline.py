"""The lmforge pipeline flow: collect → curate → validate → tokenize → train → evaluate →
register → promote → deploy.

Run it with ``lmforge run [CONFIG]``; ``lmforge ui`` serves it as a Prefect deployment with a
retraining schedule so it can be started, with edited parameters, from the Prefect UI. The
flow's only parameter is the whole :class:`PipelineConfig`, which the UI renders as a form.
"""

# No `from __future__ import annotations` here: Prefect builds its parameter model from the
# signature at run time and must see real classes, not strings.
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from lmforge.config import PipelineConfig
from lmforge.model.preflight import preflight
from lmforge.stages.base_model import ContinueFrom
from tasks.approval import promote_with_approval
from tasks.data import collect_task, curate_task, validate_task
from tasks.evaluation import evaluate_endpoint_task, evaluate_task
from tasks.registry import deploy_task, register_task
from tasks.training import choose_base_task, record_failure, tokenize_task, train_task


@flow(name="lmforge-pipeline", log_prints=True, description=__doc__)
def pipeline(config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen, so one shared default is safe
             deploy: bool = True, continue_from: ContinueFrom = "auto",
             resume_training: str | None = None) -> dict[str, Any]:
    """The whole lifecycle on one config. Each stage stops the flow on failure, so a failed run
    registers no model version and moves no alias.

    Args:
        config: The pipeline config (every section).
        deploy: Serve the champion after promotion.
        continue_from: Where training starts. auto (default): a scheduled run continues from the
            current champion (models:/NAME@ALIAS of the registry section) when one exists and
            model.base_model is empty; any other run trains as the config says. champion: always
            continue from the champion (its weights, tokenizer and chat template), replacing
            model.base_model; fails when no version holds the alias. scratch: exactly the config.
        resume_training: Continue a stopped training run from its latest checkpoint instead of
            training anew: its run id, or `latest` for the newest run that left a checkpoint.
    """
    run_id = flow_run.get_id()
    # Before any work: a config far beyond this machine's memory fails here, naming the key to change.
    checked = preflight(config)
    for warning in checked.warnings if checked else []:
        print(f"warning: {warning}")
    config = choose_base_task(config, continue_from, _scheduled())
    collected = collect_task(config.data)
    curated = curate_task(config.curation)
    validated = validate_task(config.validation)
    tokenize_task(config.tokenize, config.model, config.training, config.validation, config.platform)
    trained = train_task(config.training, config.model, config.platform, config.tokenize.finetune_heldout_fraction,
                         config.registry.experiment, resume_training)
    try:
        evaluated = evaluate_task(config.evaluation, trained["model_dir"], config.registry.model_name, config.platform)
    except Exception as exc:
        # The training's MLflow run ended FINISHED; the model it made failed evaluation. (Register marks it itself.)
        record_failure(config.platform, trained, "evaluate", exc)
        raise
    registered = register_task(config, trained, evaluated, run_id)
    # With registry.policy.approval.enabled, the run pauses here for a person's answer (a Prefect form).
    decision = promote_with_approval(config.registry, config.platform, registered["version"])
    deployed = None
    if deploy and decision["champion_version"]:  # a rejected first version leaves no champion to serve
        uri = f"models:/{config.registry.model_name}@{config.registry.alias}"
        deployed = deploy_task(config.serving, uri, config.registry.model_name)
    # The same lm-eval tasks against the server that now answers for the model name.
    endpoint_scores = evaluate_endpoint_task(config.evaluation, deployed, config.platform) \
        if deployed and config.evaluation.tasks else None
    return {
        "flow_run_id": str(run_id) if run_id else None,
        "collect": collected,
        "curate": curated,
        "validate": validated,
        "train": {k: v for k, v in trained.items() if k != "history"},
        "evaluate": {k: v for k, v in evaluated.items() if k != "examples"},
        "register": registered,
        "promote": decision,
        "deploy": deployed,
        "evaluate_endpoint": endpoint_scores,
    }


def _scheduled() -> bool:
    """True for a run the deployment's schedule created (Prefect's scheduler marks those auto_scheduled)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.auto_scheduled)
