"""Where training starts from: ``model.base_model`` turned into the local directory the engines load.

``model.base_model`` takes a local model directory, a hub name, or a registered model:
``models:/NAME@champion`` (or any alias) continues from the version that alias names now,
``models:/NAME/VERSION`` from one fixed version. The engines (``model/``, ``tokenizer/``, ``train/``)
never talk to MLflow: every stage that reads ``model.base_model`` (tokenize, train, and ``lmforge
model info`` in the CLI) calls :func:`resolve_base` first. It downloads the version into the
workspace once (:func:`lmforge.tracking.model_uris.resolve_model`, cached per version) and hands the
engines a copy of the section whose ``base_model`` is that directory. The pipeline config itself
keeps the URI, so its hash, the params logged to MLflow and the model card name
``models:/NAME@champion``, never a workspace path; the version the URI resolved to goes on the
training run as ``lmforge.base_model_*`` tags and params (:meth:`BaseModel.lineage`).

The weights, the tokenizer and the chat template all come from the registered directory: the
tokenize stage copies its tokenizer (no BPE is trained), and the template it carries is the one
used, whatever ``model.chat_template`` says (see :func:`_effective_template`).

Adapters. A registered version is a run's ``model/`` directory (:mod:`lmforge.train.artifacts`).
For LoRA, QLoRA and IA3 that directory already is the adapter merged into its base (float32, from
the saved files), so continuing needs nothing more: the merged weights are the new base, and any
method trains on top of exactly the function the champion computes (merging is chosen over
reloading base + adapter because it is what was registered, it is exact, and it leaves every
training method free). The unmergeable methods (bottleneck adapters, prefix and prompt tuning)
cannot be folded into weights: their ``model/`` holds base weights plus ``model/adapter/`` and a
marker, and loading it as a plain base would silently drop the adapter. For those the base is the
champion's base weights and the fine-tuning phase's adapter starts from the champion's adapter
(:func:`lmforge.train.artifacts.load_adapter_weights`): the method that trains its saved tensors
(the same one; ``ptuning_v2`` for prefix tuning and ``prompt`` for p-tuning, which peft saves without
their reparameterization network) keeps training it; :func:`check_continuable` refuses any other
method before a worker starts.

:func:`choose_base` is the scheduled-retraining rule (the pipeline flow's ``continue_from``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from lmforge.config.model import ModelConfig
from lmforge.config.pipeline import PipelineConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError, RegistryError
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen import tokenizer_fingerprint
from lmforge.model.chat import template_label
from lmforge.model.prompt import TEMPLATES
from lmforge.tokenizer.build import load_tokenizer
from lmforge.tracking.mlflow_tracker import mlflow_client, mlflow_uris
from lmforge.tracking.model_uris import resolve_model, version_by_alias
from lmforge.train.artifacts import adapter_kind, continuing_method, marked_adapter_dir

REGISTRY_PREFIX = "models:/"
TAG_URI = "lmforge.base_model_uri"
TAG_NAME = "lmforge.base_model_name"
TAG_VERSION = "lmforge.base_model_version"
ContinueFrom = Literal["auto", "champion", "scratch"]
# A closed port answers at once; a silent host must not hold a run for minutes of MLflow's retries.
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BaseModel:
    """``model`` is the section the engines get; ``uri``/``name``/``version`` say which registered
    version it came from (all None when ``model.base_model`` is not a ``models:/`` URI)."""

    model: ModelConfig
    uri: str | None = None
    name: str | None = None
    version: str | None = None
    adapter: Path | None = None  # the unmergeable adapter beside the base weights, to keep training

    @property
    def path(self) -> Path | None:
        return Path(self.model.base_model) if self.uri and self.model.base_model else None

    def lineage(self) -> dict[str, str]:
        """Tags (and params) for the training run: the URI as configured and the version it named."""
        if self.uri is None:
            return {}
        return {TAG_URI: self.uri, TAG_NAME: str(self.name), TAG_VERSION: str(self.version)}


def is_registry_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith(REGISTRY_PREFIX)


def resolve_base(model: ModelConfig, ws: Workspace, platform: PlatformConfig | None = None) -> BaseModel:
    """``model`` with a ``models:/`` base replaced by its downloaded directory; other values unchanged."""
    uri = model.base_model
    if uri is None or not is_registry_uri(uri):
        return BaseModel(model)

    _require_reachable(ws, platform)
    local, name, version = _registry_call(lambda: resolve_model(uri, ws, platform), ws, platform)
    resolved = model.model_copy(update={"base_model": str(local), "chat_template": _effective_template(local, model)})
    return BaseModel(resolved, uri, name, version, _marked_adapter(local))


def check_base_tokenizer(base: BaseModel, tokenizer_dir: Path) -> None:
    """Refuse a workspace tokenizer that is not the registered base's own (a stale one from an
    earlier run would feed the champion ids its embeddings never learned)."""
    if base.path is None or not (tokenizer_dir / "tokenizer_config.json").exists():
        return  # no tokenizer at all: the training engine's own check names that fix

    ours, theirs = load_tokenizer(tokenizer_dir), load_tokenizer(base.path)
    if (tokenizer_fingerprint(ours), template_label(ours)) != (tokenizer_fingerprint(theirs), template_label(theirs)):
        raise ConfigError(
            f"the workspace tokenizer at {tokenizer_dir} is not the tokenizer of base_model {base.uri} "
            f"(version {base.version})",
            "rerun `lmforge tokenize CONFIG`: with a registered base it copies that model's tokenizer and chat "
            "template (and rebuilds the tokenized datasets with them)")


def check_continuable(base: BaseModel, training: TrainingConfig) -> None:
    """An unmergeable adapter base is continued only by fine-tuning that adapter, with the method that
    trains its saved tensors: anything else would train the champion's base without the adapter that
    makes it the champion."""
    if base.adapter is None:
        return

    method = continuing_method(base.adapter)
    if training.finetunes and training.method == method:
        return
    raise ConfigError(
        f"base_model {base.uri} (version {base.version}) is an unmergeable adapter ({adapter_kind(base.adapter)}) "
        f"beside its base weights, and training.method {training.method} (finetune.steps "
        f"{training.finetune.steps}) would not keep training it",
        f"set training.method: {method} (with the adapter's settings) and finetune.steps above 0; prefix tuning and "
        "p-tuning are saved without their reparameterization network, so ptuning_v2 and prompt continue them. Or "
        "continue from a version trained with full, lora, qlora or ia3 (registered merged)")


def choose_base(configured: str | None, continue_from: ContinueFrom, scheduled: bool,
                champion: str | None) -> str | None:
    """The ``model.base_model`` a pipeline run uses (pure: no I/O).

    ``champion`` is ``models:/NAME@ALIAS`` when a version holds the alias now, else None.
    ``scratch``: the config as written. ``champion``: the champion, replacing any configured base
    (an error when there is none). ``auto``: a configured base wins; otherwise a scheduled run
    continues from the champion when one exists, and every other run (``lmforge run``, a run
    started by hand) trains as the config says, so the same config gives the same model.
    """
    if continue_from == "scratch":
        return configured
    if continue_from == "champion":
        if champion is None:
            raise RegistryError("continue_from is 'champion' but no registered version holds the alias yet",
                                "run the pipeline once from scratch (continue_from: scratch or auto) and promote it")
        return champion
    if configured is None and scheduled and champion is not None:
        return champion
    return configured


def continued(config: PipelineConfig, continue_from: ContinueFrom, scheduled: bool, ws: Workspace) -> PipelineConfig:
    """``config`` with the base :func:`choose_base` picks; the registry is asked only when the answer
    depends on it (a run from scratch never needs MLflow)."""
    configured = config.model.base_model
    asks = continue_from == "champion" or (continue_from == "auto" and scheduled and configured is None)
    champion = champion_uri(config.registry, ws, config.platform) if asks else None
    chosen = choose_base(configured, continue_from, scheduled, champion)
    if chosen == configured:
        return config
    # The URI, not a path: the run's config (and its hash) says "the champion", the train stage records which.
    return config.model_copy(update={"model": config.model.model_copy(update={"base_model": chosen})})


def champion_uri(registry: RegistryConfig, ws: Workspace, platform: PlatformConfig | None = None) -> str | None:
    """``models:/NAME@ALIAS`` when a version of ``registry.model_name`` holds ``registry.alias``, else None."""

    _require_reachable(ws, platform)
    found = _registry_call(lambda: version_by_alias(mlflow_client(ws, platform), registry.model_name, registry.alias),
                           ws, platform)
    return f"{REGISTRY_PREFIX}{registry.model_name}@{registry.alias}" if found is not None else None


# ---------------------------------------------------------------- helpers


def _effective_template(local: Path, model: ModelConfig) -> str:
    """The named template the registered model's tokenizer carries (it is the one kept and used), so the
    engines' check of ``model.chat_template`` against the tokenizer agrees with what a base means."""

    label = template_label(load_tokenizer(local))
    return label if label in TEMPLATES else model.chat_template


def _marked_adapter(local: Path) -> Path | None:
    # Imported here: it brings torch, and the pipeline flow imports this module for ContinueFrom alone.

    return marked_adapter_dir(local)


def _require_reachable(ws: Workspace, platform: PlatformConfig | None) -> None:
    """Fail in seconds, naming the server, when an MLflow tracking server does not answer at all."""
    import httpx


    registry = mlflow_uris(ws, platform)[1]
    if urlparse(registry).scheme not in ("http", "https"):
        return  # SQLite and files in the workspace: nothing to reach
    try:
        httpx.get(registry.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except httpx.TransportError as exc:
        raise _unreachable(registry, exc) from None


def _registry_call(call, ws: Workspace, platform: PlatformConfig | None):
    """``call()``, with a registry that fails mid-way reported as unreachable rather than a traceback."""
    from mlflow.exceptions import MlflowException


    try:
        return call()
    except MlflowException as exc:
        if re.search(r"Max retries exceeded|Connection(Error| refused|Refused)|timed out", str(exc)):
            raise _unreachable(mlflow_uris(ws, platform)[1], exc) from None
        raise


def _unreachable(uri: str, exc: BaseException) -> RegistryError:
    return RegistryError(
        f"cannot reach the MLflow registry at {uri} to resolve model.base_model ({type(exc).__name__}: "
        f"{str(exc)[:200]})",
        "start it (`lmforge ui` or `mlflow server`), point platform.mlflow_tracking_uri / MLFLOW_TRACKING_URI at a "
        "running one, or set model.base_model to a local model directory")
