"""Tokenize stage: the tokenizer, then training-ready tokenized datasets, versioned by content digest.

Run it with ``lmforge tokenize CONFIG`` after validate. It trains the byte-level BPE (or copies a
pretrained base's tokenizer, see :mod:`lmforge.tokenizer.build`), checks that its vocabulary fits the
model, and builds with ``datasets`` (Arrow, in ``ws.tokenized_dir``, layout in
:mod:`lmforge.data.tokenized`; on an object-store workspace everything is read from and committed to
the store, see :mod:`lmforge.core.storage.view`):

  pretrain/{train,validation}        curated documents, each ended by EOS, packed into rows of
                                     ``training.pretrain.seq_len`` tokens (optionally with
                                     per-document ``position_ids``, for attention kept inside
                                     each document)
  finetune/{train,validation,test}   SFT records rendered with the tokenizer's chat template
                                     (:mod:`lmforge.model.chat`), loss on the assistant turns only;
                                     validation is ``finetune_heldout_fraction`` of SFT train

Splits are deterministic by hash (:func:`lmforge.data.sft.split_finetune`); the directory name is
the sha256 of the tokens themselves, so the same inputs and config always give the same digest.
The rows come from :func:`lmforge.data.packing.pack_documents` and
:func:`lmforge.train.data.encode_sft`, as training's on the fly do, so
:func:`lmforge.data.tokenized.load_tokenized` returns exactly the tensors training would build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from lmforge.config.model import ModelConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.core.storage import open_store
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace
from lmforge.data.documents import iter_texts
from lmforge.data.packing import Rows, pack_documents
from lmforge.data.sft import read_sft, sft_file, split_finetune
from lmforge.data.tokenized import PHASES, file_sha256, save_tokenized
from lmforge.stages.base_model import resolve_base
from lmforge.tokenizer.build import load_tokenizer, train_tokenizer
from lmforge.train.data import encode_sft


@dataclass(frozen=True)
class TokenizeResult:
    tokenizer_dir: str
    vocab_size: int
    digest: str | None = None
    path: str | None = None
    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def tokenize(cfg: TokenizeConfig, model: ModelConfig, training: TrainingConfig, ws: Workspace,
             platform: PlatformConfig | None = None) -> TokenizeResult:
    """Train (or copy) the tokenizer, then build and store the tokenized datasets.

    A registered ``model.base_model`` (``models:/NAME@champion``) is resolved in ``platform``'s
    registry first: its own tokenizer and chat template are copied, none is trained.
    """

    model = resolve_base(model, ws, platform).model
    # On an object store: the curated text and SFT records are read from cached copies, the tokenizer
    # is committed to the store when the view closes, and the datasets after it (save_tokenized).
    inputs = (ws.curated_dir, ws.sft_dir, ws.curated_sft_dir)
    with local_view(ws, inputs, [ws.tokenizer_dir]) as view:
        tokenizer = load_tokenizer(train_tokenizer(model, view))
        check_vocab(len(tokenizer), model)
        if not cfg.build_datasets:
            return TokenizeResult(ws.shown(ws.tokenizer_dir), len(tokenizer))
        seq_lens = {"pretrain": training.pretrain.seq_len, "finetune": training.finetune.seq_len}
        tables = {"pretrain": _pretrain_rows(view, tokenizer, seq_lens["pretrain"], cfg)}
        if sft_file(view, "train").exists():
            tables["finetune"] = _finetune_rows(view, tokenizer, seq_lens["finetune"], cfg)
        digest = _digest(tables, view.tokenizer_dir / "tokenizer.json", seq_lens, cfg)
        rows = {phase: {split: len(cols["input_ids"]) for split, cols in splits.items()}
                for phase, splits in tables.items()}
        manifest = {
            "digest": digest, "rows": rows, "seq_len": seq_lens, "vocab_size": len(tokenizer),
            "tokenizer_sha256": file_sha256(view.tokenizer_dir / "tokenizer.json"),
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "unk_token_id": tokenizer.unk_token_id, "config": cfg.model_dump(mode="json"),
            "curated_digest": _curated_digest(view)}
    target = save_tokenized(ws, digest, tables, manifest)  # once the tokenizer it names is in place
    return TokenizeResult(ws.shown(ws.tokenizer_dir), len(tokenizer), digest, ws.shown(target), rows)


def ensure_tokenizer(model: ModelConfig, ws: Workspace, platform: PlatformConfig | None = None) -> None:
    """Give the workspace a tokenizer when it has none yet (``lmforge train`` without a tokenize run):
    trained on its data, or a registered base's copied (the base is resolved, downloaded, first)."""
    if open_store(ws).exists(ws.tokenizer_dir / "tokenizer.json"):
        return
    model = resolve_base(model, ws, platform).model
    with local_view(ws, (ws.curated_dir, ws.sft_dir, ws.curated_sft_dir), [ws.tokenizer_dir]) as view:
        train_tokenizer(model, view)


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


# ---------------------------------------------------------------- rows


def _pretrain_rows(ws: Workspace, tokenizer, seq_len: int, cfg: TokenizeConfig) -> dict[str, Rows]:
    out = {}
    for split in PHASES["pretrain"]:
        texts = chain.from_iterable(iter_texts(ws.curated_dir / f"{split}.parquet", cfg.batch_size))
        out[split] = pack_documents(texts, tokenizer, seq_len, allow_short=split != "train", batch_size=cfg.batch_size,
                                    with_positions=not cfg.cross_document_attention)
    return out


def _finetune_rows(ws: Workspace, tokenizer, seq_len: int, cfg: TokenizeConfig) -> dict[str, Rows]:
    train, validation = split_finetune(read_sft(sft_file(ws, "train")), cfg.finetune_heldout_fraction)
    test_path = sft_file(ws, "test")
    test = read_sft(test_path) if test_path.exists() else []
    return {name: encode_sft(records, tokenizer, seq_len)
            for name, records in (("train", train), ("validation", validation), ("test", test))}


# ---------------------------------------------------------------- versioning


def _digest(tables: dict, tokenizer_file: Path, seq_lens: dict, cfg: TokenizeConfig) -> str:
    h = hashlib.sha256()
    h.update(file_sha256(tokenizer_file).encode())
    h.update(json.dumps({"seq_len": seq_lens, "config": cfg.model_dump(mode="json")}, sort_keys=True).encode())
    for phase in sorted(tables):
        for split in sorted(tables[phase]):
            for column in sorted(tables[phase][split]):
                array = np.ascontiguousarray(tables[phase][split][column].numpy())
                h.update(f"{phase}/{split}/{column}/{array.shape}".encode())
                h.update(array.tobytes())
    return h.hexdigest()


def _curated_digest(ws: Workspace) -> str | None:
    report = ws.curated_dir / "report.json"
    return json.loads(report.read_text()).get("dataset_digest") if report.exists() else None
