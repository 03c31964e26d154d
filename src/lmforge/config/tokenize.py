"""The ``tokenize`` section: the tokenized datasets built with the tokenizer (whose size is ``model.vocab_size``)."""

from __future__ import annotations

from pydantic import Field

from lmforge.config.base import Section


class TokenizeConfig(Section):
    """The tokenize stage: the tokenizer (see `model`) and the tokenized datasets built with it."""

    build_datasets: bool = Field(True, description="Build tokenized datasets (Arrow) after the tokenizer.")
    cross_document_attention: bool = Field(
        True, description="False adds per-document position_ids to packed rows so training can keep "
        "attention inside each document.")
    finetune_heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of SFT train records "
                                             "(by hash) held out as the finetune validation split.")
    batch_size: int = Field(1000, gt=0, le=1_000_000, description="Records tokenized per batch.")
