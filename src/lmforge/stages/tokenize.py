"""Tokenize stage: the tokenizer, then training-ready tokenized datasets, versioned by content digest.

Run it with ``lmforge tokenize CONFIG`` after validate. It trains the byte-level BPE (or copies a
pretrained base's tokenizer, see :mod:`lmforge.tokenizer.build`), checks that its vocabulary fits the
model, and builds with ``datasets`` (Arrow, in the workspace):

  pretrain/{train,validation}        curated documents, each ended by EOS, packed into rows of
                                     ``training.pretrain.seq_len`` tokens (optionally with
                                     per-document ``position_ids``, for attention kept inside
                                     each document)
  finetune/{train,validation,test}   SFT records rendered with :mod:`lmforge.model.prompt` (or the chat
                                     template for ``messages`` records), loss masked on the prompt

Splits are deterministic by hash; the directory name is the sha256 of the tokens themselves, so
the same inputs and config always give the same digest. :func:`load_tokenized` returns exactly
the tensors ``lmforge.train.data.pack_texts`` / ``encode_sft`` build on the fly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.config.curation import TokenizeConfig
from lmforge.config.stages import ModelConfig, TrainingConfig
from lmforge.core.errors import ConfigError, DataError
from lmforge.model.prompt import EOS_TOKEN, format_example
from lmforge.core.workspace import Workspace, atomic_dir, atomic_write_json

IGNORE_INDEX = -100  # label value torch's cross-entropy skips
PHASES = {"pretrain": ("train", "validation"), "finetune": ("train", "validation", "test")}


@dataclass(frozen=True)
class TokenizeResult:
    tokenizer_dir: str
    vocab_size: int
    digest: str | None = None
    path: str | None = None
    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def tokenized_root(ws: Workspace) -> Path:
    return ws.home / "data" / "tokenized"


def tokenize(cfg: TokenizeConfig, model: ModelConfig, training: TrainingConfig, ws: Workspace) -> TokenizeResult:
    """Train (or copy) the tokenizer, then build and store the tokenized datasets."""
    from lmforge.tokenizer.build import load_tokenizer, train_tokenizer

    tokenizer = load_tokenizer(train_tokenizer(model, ws))
    check_vocab(len(tokenizer), model)
    if not cfg.build_datasets:
        return TokenizeResult(str(ws.tokenizer_dir), len(tokenizer))
    seq_lens = {"pretrain": training.pretrain.seq_len, "finetune": training.finetune.seq_len}
    tables = {"pretrain": _pretrain_rows(ws, tokenizer, seq_lens["pretrain"], cfg)}
    if (ws.sft_dir / "train.jsonl").exists():
        tables["finetune"] = _finetune_rows(ws, tokenizer, seq_lens["finetune"], cfg)
    digest = _digest(tables, ws.tokenizer_dir / "tokenizer.json", seq_lens, cfg)
    target = tokenized_root(ws) / digest
    rows = {phase: {split: len(cols["input_ids"]) for split, cols in splits.items()}
            for phase, splits in tables.items()}
    if not (target / "manifest.json").exists():
        _save(target, tables, {
            "digest": digest, "rows": rows, "seq_len": seq_lens, "vocab_size": len(tokenizer),
            "tokenizer_sha256": _file_sha256(ws.tokenizer_dir / "tokenizer.json"),
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "unk_token_id": tokenizer.unk_token_id, "config": cfg.model_dump(mode="json"),
            "curated_digest": _curated_digest(ws)})
    atomic_write_json(tokenized_root(ws) / "latest.json", {"digest": digest})
    return TokenizeResult(str(ws.tokenizer_dir), len(tokenizer), digest, str(target), rows)


def check_vocab(tokens: int, model: ModelConfig) -> None:
    """A tokenizer whose ids outrun the model's embeddings is a configuration error, named here."""
    if model.base_model:
        from transformers import AutoConfig

        try:
            rows = AutoConfig.from_pretrained(model.base_model).vocab_size
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the config of base_model {model.base_model!r}: {exc}",
                              "set model.base_model to a local model directory") from None
        if tokens > rows:
            raise ConfigError(f"the tokenizer has {tokens} tokens but base_model {model.base_model!r} has "
                              f"embeddings for {rows}", "use the base model's own tokenizer (remove the "
                              "workspace's tokenizer/ and rerun `lmforge tokenize`)")
    elif tokens > model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokens} tokens but model.vocab_size is {model.vocab_size}",
                          f"raise model.vocab_size to at least {tokens}, or retrain the tokenizer with "
                          "`lmforge tokenize CONFIG`")


# ---------------------------------------------------------------- pretraining rows


def _texts(path: Path, batch_size: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"no curated text at {path}", "run the curate stage first (`lmforge curate`)")
    columns = pq.ParquetFile(path).schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{path} has no `text` column (columns: {columns})", "rerun `lmforge curate`")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["text"]):
        yield [t for t in batch.column(0).to_pylist() if t]


def _pretrain_rows(ws: Workspace, tokenizer, seq_len: int, cfg: TokenizeConfig) -> dict[str, dict]:
    out = {}
    for split in PHASES["pretrain"]:
        ids: list[int] = []
        positions: list[int] = []
        for texts in _texts(ws.curated_dir / f"{split}.parquet", cfg.batch_size):
            for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                ids.extend(encoded)
                ids.append(tokenizer.eos_token_id)
                positions.extend(range(len(encoded) + 1))
        out[split] = _pack(ids, positions, seq_len, allow_short=split != "train", with_positions=not
                           cfg.cross_document_attention)
    return out


def _pack(ids: list[int], positions: list[int], seq_len: int, allow_short: bool, with_positions: bool) -> dict:
    """Blocks of exactly ``seq_len`` (tail dropped), as ``pack_texts`` does; one short block at most."""
    blocks = len(ids) // seq_len
    if blocks == 0:
        if not allow_short or len(ids) < 2:
            raise DataError(f"the text holds {len(ids)} tokens, fewer than one block of seq_len={seq_len}",
                            "collect more text, or lower training.pretrain.seq_len")
        matrix, pos = np.array([ids], dtype=np.int32), np.array([positions], dtype=np.int32)
    else:
        matrix = np.array(ids[: blocks * seq_len], dtype=np.int32).reshape(blocks, seq_len)
        pos = np.array(positions[: blocks * seq_len], dtype=np.int32).reshape(blocks, seq_len)
    cols = {"input_ids": matrix, "labels": matrix.copy(), "attention_mask": np.ones_like(matrix)}
    if with_positions:
        cols["position_ids"] = pos
    return cols


# ---------------------------------------------------------------- fine-tuning rows


def _records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        chat = isinstance(record.get("messages"), list) and record["messages"]
        if not chat and not (isinstance(record.get("instruction"), str) and isinstance(record.get("response"), str)):
            raise DataError(f"{path} line {number} has neither `messages` nor string `instruction` and `response`",
                            "regenerate the SFT set with the collect stage")
        records.append(record)
    return records


def split_heldout(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a salted hash of each record.

    The salt matters: collect already split train from test by the unsalted hash of the same
    ids, so every train record's unsalted bucket is >= the test fraction and an unsalted cut
    below it would hold out nothing.
    """
    def bucket(record: dict) -> float:
        key = str(record.get("id") or record.get("instruction", "") + record.get("response", "")
                  or json.dumps(record.get("messages"), sort_keys=True))
        return int(hashlib.sha256(f"finetune-validation:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [r for r in records if bucket(r) >= fraction]
    heldout = [r for r in records if bucket(r) < fraction]
    if not heldout and len(records) > 1:  # tiny sets: still measure something
        train, heldout = records[:-1], records[-1:]
    return train, heldout


def _prompt_and_answer(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    if record.get("messages"):
        messages = record["messages"]
        if messages[-1].get("role") != "assistant":
            raise DataError("a chat record must end with an assistant message",
                            "fix the SFT file: the last message is what the model learns to answer")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        answer = messages[-1]["content"].strip()
    else:
        prompt, completion = format_example(record["instruction"], record["response"])
        answer = completion.removesuffix(EOS_TOKEN)
    # Prompt and answer are tokenized apart, as serving tokenizes a prompt and then generates.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def _encode_sft(records: list[dict], tokenizer, seq_len: int) -> dict:
    """Right-padded rows; labels are IGNORE_INDEX on the prompt and padding (``encode_sft``'s layout)."""
    rows = []
    for record in records:
        prompt_ids, answer_ids = _prompt_and_answer(record, tokenizer)
        if len(prompt_ids) >= seq_len:  # nothing of the answer would fit: no loss to learn from
            continue
        rows.append(((prompt_ids + answer_ids)[:seq_len], ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:seq_len]))
    if not rows and records:
        raise DataError(f"all {len(records)} SFT examples have prompts longer than seq_len={seq_len}",
                        "raise training.finetune.seq_len (and model.max_seq_len)")
    input_ids = np.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=np.int32)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int32)
    mask = np.zeros((len(rows), seq_len), dtype=np.int32)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(labs)] = labs
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _finetune_rows(ws: Workspace, tokenizer, seq_len: int, cfg: TokenizeConfig) -> dict[str, dict]:
    train, validation = split_heldout(_records(ws.sft_dir / "train.jsonl"), cfg.finetune_heldout_fraction)
    test_path = ws.sft_dir / "test.jsonl"
    test = _records(test_path) if test_path.exists() else []
    return {name: _encode_sft(records, tokenizer, seq_len)
            for name, records in (("train", train), ("validation", validation), ("test", test))}


# ---------------------------------------------------------------- storage and loading


def _digest(tables: dict, tokenizer_file: Path, seq_lens: dict, cfg: TokenizeConfig) -> str:
    h = hashlib.sha256()
    h.update(_file_sha256(tokenizer_file).encode())
    h.update(json.dumps({"seq_len": seq_lens, "config": cfg.model_dump(mode="json")}, sort_keys=True).encode())
    for phase in sorted(tables):
        for split in sorted(tables[phase]):
            for column in sorted(tables[phase][split]):
                array = np.ascontiguousarray(tables[phase][split][column])
                h.update(f"{phase}/{split}/{column}/{array.shape}".encode())
                h.update(array.tobytes())
    return h.hexdigest()


def _save(target: Path, tables: dict, manifest: dict) -> None:
    import datasets

    datasets.disable_progress_bars()
    with atomic_dir(target) as tmp:
        for phase, splits in tables.items():
            for split, cols in splits.items():
                data = {name: array.tolist() for name, array in cols.items()}
                datasets.Dataset.from_dict(data).save_to_disk(str(tmp / phase / split))
        atomic_write_json(tmp / "manifest.json", manifest)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def _curated_digest(ws: Workspace) -> str | None:
    report = ws.curated_dir / "report.json"
    return json.loads(report.read_text()).get("dataset_digest") if report.exists() else None


def latest_manifest(ws: Workspace) -> dict:
    latest = tokenized_root(ws) / "latest.json"
    if not latest.exists():
        raise DataError(f"no tokenized datasets in {tokenized_root(ws)}", "run `lmforge tokenize CONFIG` first")
    digest = json.loads(latest.read_text())["digest"]
    return json.loads((tokenized_root(ws) / digest / "manifest.json").read_text())


def load_tokenized(ws: Workspace, phase: str, split: str):
    """The latest tokenized ``phase``/``split`` as long tensors: input_ids, labels, attention_mask
    (+ position_ids when built without cross-document attention), shaped (rows, seq_len)."""
    import datasets
    import torch

    if split not in PHASES.get(phase, ()):
        raise DataError(f"no tokenized split {phase}/{split}", f"use one of {PHASES}")
    manifest = latest_manifest(ws)
    if manifest["tokenizer_sha256"] != _file_sha256(ws.tokenizer_dir / "tokenizer.json"):
        raise DataError(f"the tokenized datasets {manifest['digest'][:12]} were built with another tokenizer "
                        f"than {ws.tokenizer_dir}", "rerun `lmforge tokenize CONFIG`")
    path = tokenized_root(ws) / manifest["digest"] / phase / split
    if not path.exists():
        raise DataError(f"no tokenized {phase}/{split} in {path.parent.parent}",
                        "collect an SFT set (data.instructions) and rerun `lmforge tokenize CONFIG`")
    table = datasets.load_from_disk(str(path)).with_format("numpy")
    seq_len = manifest["seq_len"][phase]
    columns = table[:] if len(table) else {name: np.zeros((0, seq_len), np.int64) for name in table.column_names}
    return {name: torch.from_numpy(np.asarray(values)).long() for name, values in columns.items()}
