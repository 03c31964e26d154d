"""The evaluate stage: held-out loss, perplexity and bits per byte, exact match and ROUGE-L on held-out
instructions, and lm-evaluation-harness tasks, all on a frozen evaluation set.

Run it alone with ``lmforge evaluate CONFIG`` (the CLI calls :func:`evaluate`). The text scored is
the model name's frozen set (``evaluation.frozen_set``, :mod:`lmforge.evaluation.frozen_store`):
frozen from the workspace's ``curated/validation.parquet`` and ``sft/test.jsonl`` the first time a
name is evaluated, then the same for every later candidate of that name, whatever the workspace's
data version, so two candidates are scored on exactly the same text. Bits per byte
(:mod:`lmforge.evaluation.heldout`) does not depend on the tokenizer, so it stays comparable when
the tokenizer is retrained. Output: one JSON report in ``ws.eval_dir`` with the metrics, the set's
digest and every generated answer, a task table (CSV) when ``evaluation.tasks`` is set, and the
``evaluate`` state hand-off. On an object-store workspace (``LMFORGE_HOME=s3://...``) the model and
the held-out data are read as cached copies and every output is written to the store; the report
and hand-off then name the model and the report by their URLs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.config.evaluation import EvaluationConfig
from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import DataError
from lmforge.core.storage import open_store
from lmforge.core.storage.recorded import recorded_dir, recorded_name
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace
from lmforge.data.documents import iter_texts
from lmforge.data.sft import read_sft, sft_file
from lmforge.evaluation import metrics as M
from lmforge.evaluation.frozen import FrozenSet, load_frozen_set, tokenizer_fingerprint, write_frozen_set
from lmforge.evaluation.frozen_store import TAG_DIGEST, TAG_TOKENIZER, freeze_into_cache, resolve_frozen_set
from lmforge.evaluation.harness import run_endpoint_tasks, run_tasks, task_metrics, task_specs, task_table
from lmforge.evaluation.heldout import score_heldout, select_heldout
from lmforge.evaluation.scoring import answer_prompt, context_window, generate_answers, load_model
from lmforge.tracking.mlflow_tracker import mlflow_client
from lmforge.tracking.model_uris import resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HELDOUT_FIX = "collect more documents or raise curation.heldout_fraction, then rerun `lmforge curate`"


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    examples: list[dict[str, Any]]  # {instruction, reference, prediction, exact_match, rouge_l}
    model_dir: str
    report_path: str
    frozen_set: dict[str, Any] = field(default_factory=dict)  # digest, source, counts, tokenizers
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    tasks_table: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # lmforge.eval.* for the registered version

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(cfg: EvaluationConfig, model_dir: Path | str, ws: Workspace, *, model_name: str | None = None,
             platform: PlatformConfig | None = None) -> EvalResult:
    """Score the model in ``model_dir`` on ``model_name``'s frozen set and write the report.

    ``model_dir`` is a directory, or where the train hand-off says the model is (on an object-store
    workspace: read as a cached copy). Without ``model_name`` (or with ``frozen_set: off``) the
    workspace's current held-out data is scored and nothing is pinned; the CLI and the pipeline
    pass ``registry.model_name``.
    """
    location = str(model_dir)
    try:
        model_dir = recorded_dir(ws, location)
    except FileNotFoundError:
        model_dir = Path(location)  # named below as the model that does not exist
    if not (model_dir / "config.json").is_file():
        raise DataError(
            f"no model to evaluate: {location}/config.json does not exist",
            "train a model first with `lmforge train` (or `lmforge run`), or pass a model directory",
        )
    if cfg.tasks:
        task_specs(cfg.tasks)  # a wrong task path fails before any scoring, not after it
    model, tokenizer = load_model(model_dir)
    frozen, source = _frozen_set(cfg, ws, tokenizer, model_name, platform)
    fingerprint = tokenizer_fingerprint(tokenizer)
    context = context_window(model.config, default=cfg.block_size)
    with torch.inference_mode():
        heldout = score_heldout(model, tokenizer, frozen.texts, min(cfg.block_size, context), cfg.batch_size)
        asked = [answer_prompt(tokenizer, record) for record in frozen.records]
        predictions = generate_answers(
            model, tokenizer, [prompt for prompt, _, _ in asked], cfg.max_new_tokens, cfg.batch_size, context
        )
    tasks = run_tasks(model, tokenizer, cfg.tasks, batch_size=cfg.batch_size, max_length=context,
                      limit=cfg.task_limit) if cfg.tasks else {}

    examples = [_scored(question, reference, prediction)
                for (_, reference, question), prediction in zip(asked, predictions)]
    scores = {
        M.EVAL_LOSS: heldout.loss,
        M.EVAL_PERPLEXITY: heldout.perplexity,
        M.EVAL_BITS_PER_BYTE: heldout.bits_per_byte,
        M.EVAL_EXACT_MATCH: M.mean(e["exact_match"] for e in examples),
        M.EVAL_ROUGE_L: M.mean(e["rouge_l"] for e in examples),
        "eval_heldout_tokens": float(heldout.tokens),
        "eval_heldout_bytes": float(heldout.bytes),
        "eval_heldout_documents": float(heldout.documents),
        "eval_num_examples": float(len(examples)),
        **task_metrics(tasks),
    }
    store = open_store(ws)
    if not ws.is_remote:
        location = str(model_dir.resolve())
    stem = f"{Path(location).name}-{_path_digest(location)}"
    report_path = ws.eval_dir / f"{stem}.json"
    table = _write_table(ws, ws.eval_dir / f"{stem}-tasks.csv", tasks) if tasks else None
    described = frozen.describe() | {"source": source, "model_tokenizer": fingerprint,
                                     "tokenizer_matches": frozen.tokenizer_fingerprint in (None, fingerprint)}
    if source in ("new", "workspace", "off"):  # kept in the workspace: named by its place there (on any machine)
        described["path"] = recorded_name(ws, ws.eval_dir / "frozen" / frozen.digest[:16])
    result = EvalResult(scores, examples, location, recorded_name(ws, report_path), described, tasks, table,
                        {TAG_DIGEST: frozen.digest, TAG_TOKENIZER: fingerprint})
    store.atomic_write_json(report_path, result.as_dict())
    ws.write_state("evaluate", {k: v for k, v in result.as_dict().items() if k != "examples"})
    return result


def evaluate_endpoint(cfg: EvaluationConfig, deployed: dict[str, Any], ws: Workspace,
                      platform: PlatformConfig | None = None) -> dict[str, Any]:
    """``evaluation.tasks`` against the deployed server (lm-eval's ``local-completions``), after deploy.

    ``deployed`` is the deploy stage's result (endpoint, served model name, model_ref). The scores
    become MLflow metrics ``endpoint/<task>/<metric>`` and a table artifact on the run of the
    registered version being served (not logged for a model served from a plain directory).
    """
    from mlflow.entities import Metric
    from transformers import AutoConfig

    model_dir, name, version = resolve_model(deployed["model_ref"], ws, platform)
    window = context_window(AutoConfig.from_pretrained(model_dir, local_files_only=True), default=cfg.block_size)
    scores = run_endpoint_tasks(deployed["endpoint"], deployed["model_name"], model_dir, cfg.tasks,
                                max_length=window, limit=cfg.task_limit)
    metrics = {"endpoint/" + key.removeprefix("task/"): value for key, value in task_metrics(scores).items()}
    table_name = f"endpoint-{name}-v{version}-tasks.csv"
    table = _write_table(ws, ws.eval_dir / table_name, scores)
    client = mlflow_client(ws, platform) if version != "local" else None
    run_id = client.get_model_version(name, version).run_id if client is not None else None
    if client is not None and run_id is not None:  # a version registered without a run has nowhere to log
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])
        client.log_text(run_id, task_table(scores), f"evaluation/{table_name}")
    result = {"endpoint": deployed["endpoint"], "model_ref": deployed["model_ref"], "version": version,
              "tasks": scores, "metrics": metrics, "tasks_table": table}
    ws.write_state("evaluate_endpoint", result)
    return result


def _frozen_set(cfg: EvaluationConfig, ws: Workspace, tokenizer: PreTrainedTokenizerBase, model_name: str | None,
                platform: PlatformConfig | None) -> tuple[FrozenSet, str]:
    """The set to score on, and its source: ``path``, ``registry``, ``workspace``, ``new`` or ``off``."""
    def freeze(dest: Path) -> FrozenSet:
        return _freeze_workspace_data(cfg, ws, tokenizer, dest, model_name)

    if cfg.frozen_set not in ("auto", "off"):
        return load_frozen_set(Path(cfg.frozen_set).expanduser().resolve()), "path"
    if cfg.frozen_set == "off" or model_name is None:
        # Still written to the content-addressed cache (the report's digest names real files), but
        # no name points at it and nothing is published.
        return freeze_into_cache(ws, freeze), "off"
    return resolve_frozen_set(ws, platform, model_name, freeze)


def _freeze_workspace_data(cfg: EvaluationConfig, ws: Workspace, tokenizer: PreTrainedTokenizerBase, dest: Path,
                           model_name: str | None) -> FrozenSet:
    """A new set from the workspace's held-out documents (within the token budget) and SFT test records."""
    # The engines read local files: on an object store, a view of cached copies of the inputs.
    with local_view(ws, (ws.curated_dir, ws.sft_dir, ws.curated_sft_dir)) as view:
        validation_path = view.curated_dir / "validation.parquet"
        test_path = sft_file(view, "test")
        named = {"heldout": recorded_name(ws, ws.home / validation_path.relative_to(view.home)),
                 "sft_test": recorded_name(ws, ws.home / test_path.relative_to(view.home))}
        _require_inputs(validation_path, test_path, named)
        return _freeze(cfg, validation_path, test_path, named, tokenizer, dest, model_name)


def _freeze(cfg: EvaluationConfig, validation_path: Path, test_path: Path, named: dict[str, str],
            tokenizer: PreTrainedTokenizerBase, dest: Path, model_name: str | None) -> FrozenSet:
    budget = cfg.max_batches * cfg.batch_size * cfg.block_size
    texts = select_heldout((t for batch in iter_texts(validation_path) for t in batch), tokenizer, budget)
    if not texts:
        raise DataError(f"{named['heldout']} holds no documents, so perplexity cannot be measured", HELDOUT_FIX)
    records = read_sft(test_path, limit=cfg.max_examples)
    if not records:
        raise DataError(f"{named['sft_test']} holds no instructions", "recreate the SFT set with `lmforge collect`")
    provenance = {"model_name": model_name, "frozen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "from": named, "token_budget": budget}
    return write_frozen_set(dest, texts, records, tokenizer, provenance)


def _scored(question: str, reference: str, prediction: str) -> dict[str, Any]:
    return {
        "instruction": question,
        "reference": reference,
        "prediction": prediction,
        "exact_match": M.exact_match(prediction, reference),
        "rouge_l": M.rouge_l_f1(prediction, reference),
    }


def _require_inputs(validation_path: Path, test_path: Path, named: dict[str, str]) -> None:
    if not validation_path.is_file():
        raise DataError(
            f"held-out documents missing: {named['heldout']} does not exist",
            "create it with `lmforge curate` (or run the whole pipeline with `lmforge run`)",
        )
    if not test_path.is_file():
        raise DataError(
            f"held-out instructions missing: {named['sft_test']} does not exist",
            "create it with `lmforge collect`, which derives the SFT set (or run `lmforge run`)",
        )


def _write_table(ws: Workspace, where: Path, scores: dict[str, dict[str, float]]) -> str:
    """The task table at ``where`` in the workspace (its store); returns how a hand-off names it."""
    open_store(ws).atomic_write_text(where, task_table(scores))
    return recorded_name(ws, where)


def _path_digest(location: str) -> str:
    return hashlib.sha256(location.encode()).hexdigest()[:8]
