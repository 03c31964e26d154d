"""The evaluate stage: held-out perplexity plus exact match and ROUGE-L on held-out instructions.

Run it alone with ``lmforge evaluate`` (the CLI calls :func:`evaluate`). Inputs, all in the
workspace: the model directory from training, ``curated/validation.parquet`` (documents never
trained on) and ``sft/test.jsonl`` (instructions never fine-tuned on). Output: one JSON report in
``ws.eval_dir`` with the metrics and every generated answer, and the ``evaluate`` state hand-off.
The documents are packed as training packs them (:mod:`lmforge.data.packing`); the model is scored
by :mod:`lmforge.evaluation.scoring`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config.evaluation import EvaluationConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.data.documents import read_texts
from lmforge.data.packing import pack_documents
from lmforge.data.sft import read_sft
from lmforge.evaluation import metrics as M
from lmforge.evaluation.scoring import (
    context_window,
    generate_answers,
    heldout_loss,
    load_model,
)

HELDOUT_FIX = "collect more documents or raise curation.heldout_fraction, then rerun `lmforge curate`"


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    examples: list[dict[str, Any]]  # {instruction, reference, prediction, exact_match, rouge_l}
    model_dir: str
    report_path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(cfg: EvaluationConfig, model_dir: Path, ws: Workspace) -> EvalResult:
    """Score the model in ``model_dir`` on the workspace's held-out data and write the report."""
    model_dir = Path(model_dir)
    validation_path = ws.curated_dir / "validation.parquet"
    test_path = ws.sft_dir / "test.jsonl"
    _require_inputs(model_dir, validation_path, test_path)
    texts = read_texts(validation_path)
    if not texts:
        raise DataError(f"{validation_path} holds no documents, so perplexity cannot be measured", HELDOUT_FIX)
    records = read_sft(test_path, limit=cfg.max_examples, chat=False)
    if not records:
        raise DataError(f"{test_path} holds no instructions", "recreate the SFT set with `lmforge collect`")

    model, tokenizer = load_model(model_dir)
    context = context_window(model.config, default=cfg.block_size)
    with torch.inference_mode():
        blocks = pack_documents(texts, tokenizer, min(cfg.block_size, context), allow_short=True,
                                max_blocks=cfg.max_batches * cfg.batch_size, what="the held-out documents",
                                fix=HELDOUT_FIX)["input_ids"]
        loss, n_tokens = heldout_loss(model, blocks, cfg.batch_size)
        predictions = generate_answers(
            model, tokenizer, [r["instruction"] for r in records], cfg.max_new_tokens, cfg.batch_size, context
        )

    examples = [_scored(record, prediction) for record, prediction in zip(records, predictions)]
    scores = {
        M.EVAL_LOSS: loss,
        M.EVAL_PERPLEXITY: M.perplexity(loss),
        M.EVAL_EXACT_MATCH: M.mean(e["exact_match"] for e in examples),
        M.EVAL_ROUGE_L: M.mean(e["rouge_l"] for e in examples),
        "eval_heldout_tokens": float(n_tokens),
        "eval_num_examples": float(len(examples)),
    }
    report_path = ws.eval_dir / f"{model_dir.name}-{_path_digest(model_dir)}.json"
    result = EvalResult(scores, examples, str(model_dir.resolve()), str(report_path))
    atomic_write_json(report_path, result.as_dict())
    ws.write_state(
        "evaluate", {"model_dir": result.model_dir, "report_path": result.report_path, "metrics": scores}
    )
    return result


def _scored(record: dict, prediction: str) -> dict[str, Any]:
    return {
        "instruction": record["instruction"],
        "reference": record["response"],
        "prediction": prediction,
        "exact_match": M.exact_match(prediction, record["response"]),
        "rouge_l": M.rouge_l_f1(prediction, record["response"]),
    }


def _require_inputs(model_dir: Path, validation_path: Path, test_path: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise DataError(
            f"no model to evaluate: {model_dir / 'config.json'} does not exist",
            "train a model first with `lmforge train` (or `lmforge run`), or pass a model directory",
        )
    if not validation_path.is_file():
        raise DataError(
            f"held-out documents missing: {validation_path} does not exist",
            "create it with `lmforge curate` (or run the whole pipeline with `lmforge run`)",
        )
    if not test_path.is_file():
        raise DataError(
            f"held-out instructions missing: {test_path} does not exist",
            "create it with `lmforge collect`, which derives the SFT set (or run `lmforge run`)",
        )


def _path_digest(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
