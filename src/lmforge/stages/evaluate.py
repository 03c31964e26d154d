"""The evaluate stage: held-out perplexity plus exact match and ROUGE-L on held-out instructions.

Run it alone with ``lmforge evaluate`` (the CLI calls :func:`evaluate`). Inputs, all in the
workspace: the model directory from training, ``curated/validation.parquet`` (documents never
trained on) and ``sft/test.jsonl`` (instructions never fine-tuned on). Output: one JSON report in
``ws.eval_dir`` with the metrics and every generated answer, and the ``evaluate`` state hand-off.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.evaluation import metrics as M
from lmforge.config.stages import EvaluationConfig
from lmforge.core.errors import DataError
from lmforge.model.prompt import format_prompt
from lmforge.core.workspace import Workspace, atomic_write_json


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
    import torch

    model_dir = Path(model_dir)
    validation_path = ws.curated_dir / "validation.parquet"
    test_path = ws.sft_dir / "test.jsonl"
    _require_inputs(model_dir, validation_path, test_path)
    texts = read_heldout_texts(validation_path)
    records = read_sft_records(test_path, cfg.max_examples)

    model, tokenizer = load_model(model_dir)
    context = context_window(model.config, default=cfg.block_size)
    with torch.inference_mode():
        blocks = pack_blocks(texts, tokenizer, min(cfg.block_size, context), cfg.max_batches * cfg.batch_size)
        loss, n_tokens = heldout_loss(model, blocks, cfg.batch_size)
        predictions = generate_answers(
            model, tokenizer, [r["instruction"] for r in records], cfg.max_new_tokens, cfg.batch_size, context
        )

    examples = []
    for record, prediction in zip(records, predictions):
        examples.append(
            {
                "instruction": record["instruction"],
                "reference": record["response"],
                "prediction": prediction,
                "exact_match": M.exact_match(prediction, record["response"]),
                "rouge_l": M.rouge_l_f1(prediction, record["response"]),
            }
        )
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


def read_heldout_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path} has no `text` column", "recreate it with `lmforge curate`")
    texts = [t for t in table.column("text").to_pylist() if t]
    if not texts:
        raise DataError(
            f"{path} holds no documents, so perplexity cannot be measured",
            "collect more documents or raise curation.heldout_fraction, then rerun `lmforge curate`",
        )
    return texts


def read_sft_records(path: Path, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` records of an SFT JSONL file; each must have instruction and response."""
    records: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records.append({"instruction": str(record["instruction"]), "response": str(record["response"])})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{line_no} is not a JSON object with instruction and response ({exc})",
                    "recreate the SFT set with `lmforge collect`",
                ) from exc
    if not records:
        raise DataError(f"{path} holds no instructions", "recreate the SFT set with `lmforge collect`")
    return records


def load_model(model_dir: Path):
    """Model and tokenizer from a local directory: safetensors only, never remote code."""
    import torch
    from transformers import AutoTokenizer

    from lmforge.train.artifacts import load_trained

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # Prompt-learning and bottleneck adapters cannot be merged: load_trained applies them, so the
    # tuned model is measured, not its base.
    model = load_trained(model_dir, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        # Padded positions are masked out, so any id works; EOS keeps the vocabulary unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_window(config: Any, default: int) -> int:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def pack_blocks(texts: list[str], tokenizer: Any, block_size: int, max_blocks: int) -> list[list[int]]:
    """Documents joined with EOS, cut into ``block_size`` windows, as many as ``max_blocks``.

    A ragged tail is dropped so every block is scored with the same context, unless it is the only
    block the held-out set can fill.
    """
    eos = tokenizer.eos_token_id
    needed = block_size * max_blocks
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if len(stream) >= needed:
            break
    stream = stream[:needed]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < block_size:
        blocks.pop()
    if not blocks or len(blocks[0]) < 2:
        raise DataError(
            "the held-out documents hold fewer than 2 tokens, so perplexity cannot be measured",
            "collect more documents or raise curation.heldout_fraction, then rerun `lmforge curate`",
        )
    return blocks


def heldout_loss(model: Any, blocks: list[list[int]], batch_size: int) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over every predicted token, and that token count."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size], dtype=torch.long)
        logits = model(input_ids=ids).logits
        targets = ids[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += targets.numel()
    return total / count, count


def generate_answers(
    model: Any, tokenizer: Any, instructions: list[str], max_new_tokens: int, batch_size: int, context: int
) -> list[str]:
    """Greedy answers to each instruction in the shared prompt format, cut at the first EOS."""
    from transformers import GenerationConfig

    max_new_tokens = max(1, min(max_new_tokens, context - 1))
    # Left padding and left truncation keep every prompt's end (the "### Response:" cue) adjacent
    # to the generated tokens.
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # A fresh config so sampling settings saved with the model never leak into the evaluation.
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    answers: list[str] = []
    for start in range(0, len(instructions), batch_size):
        prompts = [format_prompt(text) for text in instructions[start : start + batch_size]]
        encoded = tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=context - max_new_tokens
        )
        output = model.generate(**encoded, generation_config=generation)
        for row in output[:, encoded["input_ids"].shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def _path_digest(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
