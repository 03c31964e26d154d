"""The ``lmforge`` command line: one entry point for every stage and service.

``lmforge run [CONFIG]`` runs the whole pipeline as a Prefect flow; ``lmforge STAGE CONFIG`` runs
one stage alone from what earlier stages left in the workspace; ``lmforge serve MODEL`` starts the
inference server; ``lmforge ui`` starts the Prefect and MLflow UIs with the pipeline deployed;
``lmforge stack up|down|status`` runs the platform's services as local processes.
Expected errors print as ``error:`` / ``fix:`` lines without a traceback (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.config import PipelineConfig, load_config
from lmforge.core.errors import LmforgeError
from lmforge.core.report import console, emit, run_summary
from lmforge.core.runtime import prepare_environment
from lmforge.core.workspace import Workspace
from lmforge.train.recovery import LATEST_RUN


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    try:
        args.handler(args)
    except LmforgeError as exc:
        print(f"error: {exc.cause}\n  fix: {exc.fix}", file=sys.stderr)
        report = getattr(exc, "report", "")
        if report:
            print(report, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------- commands


def _setup(args: argparse.Namespace) -> tuple[PipelineConfig, Workspace]:
    config = load_config(getattr(args, "config", None))
    ws = Workspace.from_env(getattr(args, "home", None))
    # The workspace's store is checked before any work: a wrong LMFORGE_HOME (unknown scheme, missing
    # bucket, refused credentials) fails here with its fix, not halfway through a stage.
    from lmforge.core.storage import check

    check(ws)
    prepare_environment(ws)
    return config, ws


def redacted_for_flow(config: PipelineConfig) -> PipelineConfig:
    """``config`` with every data-source URL's user name and password replaced by ``***``: Prefect stores a
    flow run's parameters, and collect drops URLs with credentials anyway (``credentials_in_url``)."""
    from lmforge.collection.urls import redact_urls

    data = config.data.model_dump(mode="json")
    redacted = redact_urls(data)
    if redacted == data:
        return config
    return config.model_copy(update={"data": type(config.data).model_validate(redacted)})


def cmd_run(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from flows.pipeline import pipeline
    from flows.prefect_api import ensure_api
    from lmforge.tracking.mlflow_tracker import mlflow_uris

    out = console(args.json)
    out.print(f"[bold]lmforge run[/bold]: workspace {ws.home}")
    # Prefect's temporary server (no PREFECT_API_URL) is started here, with the time a busy machine needs
    # and a clear error, not inside the flow's first client call.
    ensure_api()
    try:
        result = pipeline(config=redacted_for_flow(config), deploy=not args.no_deploy)
    except Exception as exc:  # noqa: BLE001 - Prefect re-raises the stage's own exception, unwrapped here
        raise _unwrap(exc) from None
    emit("lmforge run", run_summary(result, mlflow_uris(ws, config.platform)[0]), args.json)


def cmd_collect(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.collect import collect

    emit("collect", collect(config.data, ws).as_dict(), args.json)


def cmd_curate(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.curate import curate

    emit("curate", curate(config.curation, ws).as_dict(), args.json)


def cmd_validate(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.validate import validate

    emit("validate", validate(config.validation, ws).as_dict(), args.json)


def cmd_tokenize(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.tokenize import tokenize
    from lmforge.stages.validate import validate_tokenized

    result = tokenize(config.tokenize, config.model, config.training, ws, platform=config.platform).as_dict()
    if result["digest"]:
        result["validation"] = validate_tokenized(config.validation, ws).success
    emit("tokenize", result, args.json)


def cmd_train(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    _preflight(config)
    from lmforge.stages.tokenize import ensure_tokenizer
    from lmforge.stages.train import train

    ensure_tokenizer(config.model, ws, config.platform)
    result = train(config.training, config.model, ws, ray_address=config.platform.ray_address,
                   finetune_heldout_fraction=config.tokenize.finetune_heldout_fraction,
                   experiment=config.registry.experiment, platform=config.platform, resume=args.resume).as_dict()
    emit("train", {k: v for k, v in result.items() if k != "history"}, args.json)


def cmd_tune(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.tune import tune

    result = tune(config, ws, resume=args.resume).as_dict()
    emit("tune", {k: v for k, v in result.items() if k != "trial_outcomes"}, args.json)


def cmd_evaluate(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.evaluate import evaluate
    from lmforge.stages.lineage import latest_model

    model_dir = args.model or latest_model(ws)
    result = evaluate(config.evaluation, model_dir, ws, model_name=config.registry.model_name, platform=config.platform)
    emit("evaluate", {**result.metrics, "frozen_set": result.frozen_set["digest"], "tasks": result.tasks}, args.json)


def cmd_promote(args: argparse.Namespace) -> None:
    """Register the latest trained and evaluated model (once), then apply the promotion rule."""
    config, ws = _setup(args)
    from lmforge.stages.lineage import require_state
    from lmforge.stages.promote import promote
    from lmforge.stages.register import register_trained

    if args.approve or args.reject:  # a person's answer on a pending candidate (registry.policy.approval)
        from lmforge.stages.promote import settle_approval

        version = args.approve or args.reject
        decision = settle_approval(config.registry, config.platform, ws, version, approved=bool(args.approve),
                                   comment=args.comment or "").as_dict()
        emit("promote", {"version": version, **decision}, args.json)
        return
    trained = require_state(ws, "train", "lmforge train CONFIG")
    evaluated = require_state(ws, "evaluate", "lmforge evaluate CONFIG")
    registered = ws.read_state("register")
    if not registered or registered.get("train_run_id") != trained["run_id"]:
        registered = register_trained(config, ws, trained, evaluated, None)
    decision = promote(config.registry, config.platform, ws, str(registered["version"])).as_dict()
    emit("promote", {"version": registered["version"], **decision}, args.json)


def cmd_rollback(args: argparse.Namespace) -> None:
    """Move the alias back to the version that held it before; the deployment follows."""
    config, ws = _setup(args)
    from lmforge.stages.rollback import rollback

    result = rollback(config.registry, config.platform, ws, args.model).as_dict()
    emit("rollback", {"alias": result["alias"], "from_version": result["from_version"],
                      "to_version": result["to_version"], "model_name": result["name"],
                      "deployment": result["deployment"]}, args.json)


def cmd_deploy(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.stages.deploy import deploy, stop

    if args.stop:
        emit("deploy", {"stopped": stop(ws)}, args.json)
        return
    uri = args.model or f"models:/{config.registry.model_name}@{config.registry.alias}"
    emit("deploy", deploy(config.serving, uri, ws, config.registry.model_name).as_dict(), args.json)


def cmd_serve(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.serving.api import api_key_from, parse_adapters, serve_model

    serve_model(args.model, parse_adapters(args.adapter, config.serving), ws, host=args.host, port=args.port,
                api_key=api_key_from(args.api_key, args.api_key_file))


def cmd_export_onnx(args: argparse.Namespace) -> None:
    _config, ws = _setup(args)
    from lmforge.serving.api import resolve_model_dir
    from lmforge.serving.export import export_onnx

    model_dir, _name = resolve_model_dir(args.model, ws)
    emit("export-onnx", export_onnx(model_dir, Path(args.out_dir), args.opset).as_dict(), args.json)


def cmd_models(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.tracking.mlflow_tracker import list_models

    models = list_models(ws, config.platform, metric=config.registry.policy.metric)
    emit("models", {m["name"]: m for m in models} or {"models": "none registered"}, args.json)


def cmd_ui(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    from lmforge.ui import run_ui

    run_ui(config, ws, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
           config_path=args.config)


def cmd_stack(args: argparse.Namespace) -> None:
    config, ws = _setup(args)
    if args.stack_command == "deploy":  # registering flows needs Prefect and flows/: above the stack engine
        from flows.deployments import register_on_stack
        emit("lmforge stack deploy", register_on_stack(config, ws), args.json)
        return
    from lmforge.stack.commands import run_stack

    run_stack(args, config, ws)


def cmd_model_info(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    from lmforge.model.info import describe, fit_warning, info_lines
    from lmforge.stages.base_model import resolve_base

    # A models:/NAME@ALIAS base is read from its downloaded directory (the engine never sees the URI).
    model = resolve_base(config.model, Workspace.from_env(args.home), config.platform).model
    info = describe(model, config.training)
    warning = fit_warning(model, config.training)
    if args.json:
        print(json.dumps({**info.as_dict(), "warning": warning}, default=str))
        return
    print("\n".join(info_lines(info) + ([f"warning: {warning}"] if warning else [])))


def cmd_config_show(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    if args.json:
        print(json.dumps(config.model_dump(mode="json"), sort_keys=True))
    else:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")


def cmd_config_schema(args: argparse.Namespace) -> None:
    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))


def _preflight(config: PipelineConfig) -> None:
    """Refuse a config far beyond this machine's memory before any work; warn when it is close."""
    from lmforge.model.preflight import preflight

    result = preflight(config)
    for warning in result.warnings if result else []:
        print(f"warning: {warning}", file=sys.stderr)


# ---------------------------------------------------------------- parser


def _unwrap(exc: BaseException) -> BaseException:
    """Find our own error inside wrappers (Ray, Prefect) so the user sees cause and fix."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LmforgeError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


_STAGES: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "collect": (cmd_collect, "collect documents from the configured sources"),
    "curate": (cmd_curate, "normalize, deduplicate and filter the collected documents"),
    "validate": (cmd_validate, "run the Great Expectations data gate on the curated corpus"),
    "tokenize": (cmd_tokenize, "train the tokenizer and build the validated tokenized datasets"),
    "train": (cmd_train, "pretrain and fine-tune the model (Ray Train)"),
    "tune": (cmd_tune, "hyperparameter search over training and model keys (Ray Tune, ASHA; tune section)"),
    "evaluate": (cmd_evaluate, "held-out perplexity, exact match and ROUGE-L"),
    "promote": (cmd_promote, "register the latest model in MLflow and move the alias by rule"),
    "deploy": (cmd_deploy, "serve the champion from the registry and send one request"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="workspace directory (default: $LMFORGE_HOME or ./.lmforge)")
    sub = parser.add_subparsers(dest="command")

    def command(name: str, handler: Callable, help_text: str, config_required: bool = False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs=None if config_required else "?", help="pipeline config YAML")
        p.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
        p.set_defaults(handler=handler)
        return p

    run = command("run", cmd_run, "run the whole pipeline as a Prefect flow")
    run.add_argument("--no-deploy", action="store_true", help="stop after promotion")
    for name, (handler, help_text) in _STAGES.items():
        p = command(name, handler, help_text)
        if name == "train":
            p.add_argument("--resume", nargs="?", const=LATEST_RUN, metavar="RUN_ID",
                           help="continue a stopped run from its latest checkpoint (default: the newest such run)")
        if name == "tune":
            p.add_argument("--resume", nargs="?", const=LATEST_RUN, metavar="TUNE_ID",
                           help="continue a stopped search (its finished trials kept; default: the newest stopped one)")
        if name == "evaluate":
            p.add_argument("--model", help="model directory (default: the latest trained model)")
        if name == "deploy":
            p.add_argument("--model", help="registry URI or model directory (default: NAME@champion)")
            p.add_argument("--stop", action="store_true", help="stop the deployed server")
        if name == "promote":
            answer = p.add_mutually_exclusive_group()
            answer.add_argument("--approve", metavar="VERSION",
                                help="approve a pending version: it is promoted if the rules still pass")
            answer.add_argument("--reject", metavar="VERSION", help="reject a pending version (recorded on it)")
            p.add_argument("--comment", help="why, recorded with --approve/--reject")

    serve = sub.add_parser("serve", help="start the OpenAI-compatible inference server")
    serve.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory")
    serve.add_argument("--config", help="pipeline config YAML (its serving section)")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config; 0 picks a free one)")
    serve.add_argument("--api-key", help="require this Bearer token; it shows in the process list, so prefer "
                       "--api-key-file or the LMFORGE_API_KEY environment variable (comma-separated for several)")
    serve.add_argument("--api-key-file", type=Path, metavar="PATH",
                       help="require the Bearer token on the first line of this file")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="serve this LoRA adapter unmerged beside the base as model NAME (repeatable)")
    serve.set_defaults(handler=cmd_serve)

    onnx = sub.add_parser("export-onnx", help="export a model to ONNX (KV cache in and out) for `lmforge serve OUT_DIR`")
    onnx.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory")
    onnx.add_argument("out_dir", help="directory for model.onnx, tokenizer, config and onnx_model.json")
    onnx.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    onnx.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    onnx.set_defaults(handler=cmd_export_onnx)

    rollback = sub.add_parser("rollback", help="move the alias back to its previous version; the deployment follows")
    rollback.add_argument("model", nargs="?", help="registered model name (default: registry.model_name)")
    rollback.add_argument("--config", help="pipeline config YAML (its registry and platform sections)")
    rollback.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    rollback.set_defaults(handler=cmd_rollback)

    models = command("models", cmd_models, "list registered models, versions and aliases")
    models.set_defaults(handler=cmd_models)

    ui = command("ui", cmd_ui, "start the Prefect and MLflow UIs with the pipeline deployed")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)

    from lmforge.stack.commands import add_stack_parser

    add_stack_parser(sub, cmd_stack)

    model = sub.add_parser("model", help="facts about the configured model")
    model_sub = model.add_subparsers(dest="model_command")
    info = model_sub.add_parser("info", help="parameters, FLOPs per token and training memory at the configured batch")
    info.add_argument("config", nargs="?", help="pipeline config YAML (default: built-in defaults)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_model_info)

    cfg = sub.add_parser("config", help="show the resolved config or its JSON schema")
    cfg_sub = cfg.add_subparsers(dest="config_command")
    show = cfg_sub.add_parser("show", help="print the resolved config of FILE (defaults filled in)")
    show.add_argument("config", help="pipeline config YAML")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_config_show)
    schema = cfg_sub.add_parser("schema", help="print the JSON schema of the pipeline config")
    schema.set_defaults(handler=cmd_config_schema)
    return parser


if __name__ == "__main__":
    sys.exit(main())

